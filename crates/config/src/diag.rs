//! Diagnostics in the `path:line:col: message` form every config error uses.

use std::fmt;
use std::path::PathBuf;

/// One problem found in a config file. Lines and columns are 1-based; a
/// problem with no position in a file (say, an unreadable directory) uses 0.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: u64,
    pub column: u64,
    pub message: String,
}

impl Diagnostic {
    pub fn new(
        file: impl Into<PathBuf>,
        line: u64,
        column: u64,
        message: impl Into<String>,
    ) -> Self {
        Self {
            file: file.into(),
            line,
            column,
            message: message.into(),
        }
    }

    /// Diagnostic at a position recorded on a [`crate::model::Pos`].
    pub fn at(pos: &crate::model::Pos, message: impl Into<String>) -> Self {
        Self::new(pos.file.as_ref(), pos.line, pos.column, message)
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}
