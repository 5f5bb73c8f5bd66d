//! The path the access policy matches is the path the app receives: the
//! request's path is normalized here, before the policy looks at it
//! (`tandem_config::authz::normalize_path`: unreserved percent-encodings
//! decoded, `.`/`..` resolved, `//` merged), and a path that servers could
//! read two ways (encoded `/`, backslashes, encoded NUL, `;` parameters) is
//! answered `400 bad-request` and never reaches the app.

use std::borrow::Cow;

use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use tandem_config::authz::normalize_path;

use crate::body::Body;
use crate::ctx::RequestCtx;
use crate::error::{Error, MeshError};
use crate::svc::{layer, Service};

layer!(
    /// Inbound: the request's path, normalized.
    NormalizePathLayer => NormalizePath {}
);

impl<S: Service> Service for NormalizePath<S> {
    async fn call(
        &self,
        mut req: Request<Body>,
        ctx: &mut RequestCtx,
    ) -> Result<Response<Body>, Error> {
        let normal = match normalize_path(req.uri().path()) {
            Ok(Cow::Borrowed(_)) => None,
            Ok(Cow::Owned(p)) => Some(p),
            Err(e) => {
                return Err(Error::new(
                    MeshError::BadRequest,
                    format!("the request path has {}", e.describe()),
                ))
            }
        };
        if let Some(mut p) = normal {
            if let Some(q) = req.uri().query() {
                p.push('?');
                p.push_str(q);
            }
            let pq = PathAndQuery::try_from(p)
                .map_err(|e| Error::new(MeshError::BadRequest, e.to_string()))?;
            let mut parts = req.uri().clone().into_parts();
            parts.path_and_query = Some(pq);
            *req.uri_mut() = Uri::from_parts(parts)
                .map_err(|e| Error::new(MeshError::BadRequest, e.to_string()))?;
        }
        self.inner.call(req, ctx).await
    }
}
