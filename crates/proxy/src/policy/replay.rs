//! A request body that can be sent again: it streams to the first try as
//! it arrives (nothing waits for the whole body, so a client-streaming gRPC
//! call flows as usual) while keeping a copy of what went by, up to
//! [`REPLAY_LIMIT`]. A retry replays the copy and then goes on reading from
//! the client where the previous try stopped. Once more than the limit has
//! gone by the copy is dropped, and the request can no longer be retried.
//!
//! Only one try holds the body at a time: a try's handle gives the state
//! back when hyper drops it, and [`Replay::next_try`] waits for that.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Frame, SizeHint};
use tandem_runtime::sync::Mutex;

/// Most bytes of a request body kept for a retry.
pub(crate) const REPLAY_LIMIT: usize = 64 * 1024;

/// Longest a retry waits for the previous try to let go of the body (hyper
/// may still be writing it when the answer arrives).
const RELEASE_WAIT: Duration = Duration::from_secs(1);

struct State<B> {
    /// Data frames seen so far, unless `capped`.
    copy: Vec<Bytes>,
    copied: usize,
    trailers: Option<HeaderMap>,
    /// The client's body, until its end.
    rest: Option<B>,
    /// More than the limit went by: no replay.
    capped: bool,
}

struct Shared<B> {
    state: Mutex<Option<Box<State<B>>>>,
    released: tokio::sync::Notify,
    hint: SizeHint,
    empty: bool,
}

/// The request body of one try.
pub(crate) struct Replay<B = hyper::body::Incoming> {
    shared: Arc<Shared<B>>,
    state: Option<Box<State<B>>>,
    /// How many frames of the copy this try has sent.
    pos: usize,
    trailers_sent: bool,
}

impl<B: http_body::Body> Replay<B> {
    pub(crate) fn new(body: B) -> Replay<B> {
        let hint = body.size_hint();
        let empty = body.is_end_stream();
        let shared = Arc::new(Shared {
            state: Mutex::new(None),
            released: tokio::sync::Notify::new(),
            hint,
            empty,
        });
        Replay {
            shared,
            state: Some(Box::new(State {
                copy: Vec::new(),
                copied: 0,
                trailers: None,
                rest: (!empty).then_some(body),
                capped: false,
            })),
            pos: 0,
            trailers_sent: false,
        }
    }

    /// A handle to give the next try, taken before this one is sent.
    pub(crate) fn handle(&self) -> ReplayHandle<B> {
        ReplayHandle(self.shared.clone())
    }
}

/// Makes further tries of a body.
pub(crate) struct ReplayHandle<B = hyper::body::Incoming>(Arc<Shared<B>>);

impl<B> ReplayHandle<B> {
    /// Known already to be past the copy's limit (false while a try still
    /// holds the body: [`ReplayHandle::next_try`] tells then).
    pub(crate) fn outgrown(&self) -> bool {
        self.0.state.lock().as_ref().is_some_and(|s| s.capped)
    }

    /// The body for the next try, once the previous try has let go of it;
    /// `None` when it can no longer be replayed (more than the limit went
    /// by) or the previous try still holds it after a while.
    pub(crate) async fn next_try(&self) -> Option<Replay<B>> {
        let wait = async {
            loop {
                let released = self.0.released.notified();
                {
                    let state = self.0.state.lock();
                    if let Some(s) = state.as_ref() {
                        return !s.capped;
                    }
                }
                released.await;
            }
        };
        if !tokio::time::timeout(RELEASE_WAIT, wait)
            .await
            .unwrap_or(false)
        {
            return None;
        }
        Some(Replay {
            shared: self.0.clone(),
            state: None,
            pos: 0,
            trailers_sent: false,
        })
    }
}

impl<B> Drop for Replay<B> {
    fn drop(&mut self) {
        if let Some(s) = self.state.take() {
            *self.shared.state.lock() = Some(s);
            self.shared.released.notify_waiters();
        }
    }
}

impl<B> http_body::Body for Replay<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if this.state.is_none() {
            this.state = this.shared.state.lock().take();
        }
        let Some(state) = this.state.as_mut() else {
            // Only reachable if two tries were sent at once; end the body
            // rather than send part of it twice.
            return Poll::Ready(None);
        };
        // First what an earlier try already sent.
        if !state.capped && this.pos < state.copy.len() {
            let data = state.copy[this.pos].clone();
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(rest) = state.rest.as_mut() {
            match Pin::new(rest).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        if !state.capped {
                            state.copied += data.len();
                            if state.copied > REPLAY_LIMIT {
                                state.capped = true;
                                state.copy = Vec::new();
                            } else {
                                state.copy.push(data.clone());
                                this.pos = state.copy.len();
                            }
                        }
                    } else if let Some(t) = frame.trailers_ref() {
                        state.trailers = Some(t.clone());
                        state.rest = None;
                        this.trailers_sent = true;
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(e))) => {
                    // The client's body broke: nothing to replay either.
                    state.capped = true;
                    state.rest = None;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => state.rest = None,
            }
        }
        match &state.trailers {
            Some(t) if !this.trailers_sent => {
                this.trailers_sent = true;
                Poll::Ready(Some(Ok(Frame::trailers(t.clone()))))
            }
            _ => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            None => self.shared.empty,
            Some(s) => {
                (s.capped || self.pos >= s.copy.len())
                    && s.rest.as_ref().is_none_or(|r| r.is_end_stream())
                    && (s.trailers.is_none() || self.trailers_sent)
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.shared.hint
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::convert::Infallible;

    use http_body::Body as _;
    use http_body_util::BodyExt;

    use super::*;

    /// A client body: its frames, in order.
    struct Frames(VecDeque<Frame<Bytes>>);

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
    }

    fn client(parts: &[&'static [u8]], trailers: bool) -> Frames {
        let mut f: VecDeque<_> = parts
            .iter()
            .map(|p| Frame::data(Bytes::from_static(p)))
            .collect();
        if trailers {
            let mut t = HeaderMap::new();
            t.insert("x-sum", "1".parse().expect("value"));
            f.push_back(Frame::trailers(t));
        }
        Frames(f)
    }

    async fn read_all<B>(b: Replay<B>) -> (Vec<u8>, Option<HeaderMap>)
    where
        B: http_body::Body<Data = Bytes, Error = Infallible> + Unpin,
    {
        let c = b.collect().await.expect("infallible");
        let t = c.trailers().cloned();
        (c.to_bytes().to_vec(), t)
    }

    #[tokio::test]
    async fn a_retry_sends_the_same_body_and_trailers() {
        let first = Replay::new(client(&[b"hello ", b"world"], true));
        let again = first.handle();
        assert_eq!(
            read_all(first).await,
            (b"hello world".to_vec(), Some(trailers()))
        );
        let second = again.next_try().await.expect("replayable");
        assert_eq!(
            read_all(second).await,
            (b"hello world".to_vec(), Some(trailers()))
        );
    }

    fn trailers() -> HeaderMap {
        let mut t = HeaderMap::new();
        t.insert("x-sum", "1".parse().expect("value"));
        t
    }

    #[tokio::test]
    async fn a_try_that_stopped_early_is_continued_by_the_next() {
        let mut first = Replay::new(client(&[b"a", b"b", b"c"], false));
        let again = first.handle();
        // The first try reads one frame, then is dropped (an early answer).
        let f = first.frame().await.expect("frame").expect("ok");
        assert_eq!(f.into_data().expect("data"), Bytes::from_static(b"a"));
        drop(first);
        let second = again.next_try().await.expect("replayable");
        assert_eq!(read_all(second).await, (b"abc".to_vec(), None));
    }

    #[tokio::test]
    async fn more_than_the_limit_is_not_replayed() {
        static BIG: [u8; REPLAY_LIMIT] = [7; REPLAY_LIMIT];
        let first = Replay::new(client(&[&BIG, b"!"], false));
        let again = first.handle();
        let (body, _) = read_all(first).await;
        assert_eq!(body.len(), REPLAY_LIMIT + 1);
        assert!(again.next_try().await.is_none());
        // Exactly the limit still is.
        let first = Replay::new(client(&[&BIG], false));
        let again = first.handle();
        assert_eq!(read_all(first).await.0.len(), REPLAY_LIMIT);
        let second = again.next_try().await.expect("replayable");
        assert_eq!(read_all(second).await.0.len(), REPLAY_LIMIT);
    }

    #[tokio::test]
    async fn a_body_still_held_by_the_previous_try_is_not_replayed() {
        let mut first = Replay::new(client(&[b"x"], false));
        let again = first.handle();
        let _ = first.frame().await;
        // `first` is still alive: the retry gives up after the wait.
        assert!(again.next_try().await.is_none());
        drop(first);
        assert!(again.next_try().await.is_some());
    }

    #[test]
    fn empty_bodies_end_at_once() {
        let b = Replay::new(client(&[], false));
        assert!(b.is_end_stream());
        let again = b.handle();
        drop(b);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let next = rt.block_on(again.next_try()).expect("replayable");
        assert!(next.is_end_stream());
    }
}
