//! Response bodies. A relayed stream passes each upstream frame to the client as it
//! arrives (no buffering), bounds the silence between frames, and reports the attempt's
//! outcome and the request's metrics when the stream ends, fails or is dropped.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::time::Sleep;

use crate::outcome::RequestRecord;
use crate::upstream::{Attempt, Outcome};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ResBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> Full<Bytes> {
    Full::new(bytes.into())
}

pub fn boxed_full(bytes: impl Into<Bytes>) -> ResBody {
    full(bytes).map_err(|never| match never {}).boxed_unsync()
}

pin_project_lite::pin_project! {
    pub struct RelayBody {
        first: Option<Frame<Bytes>>,
        #[pin]
        inner: Incoming,
        #[pin]
        idle: Sleep,
        idle_timeout: Duration,
        attempt: Option<Attempt>,
        record: Option<RequestRecord>,
        ttfb: Duration,
        outcome: Outcome,
    }

    impl PinnedDrop for RelayBody {
        fn drop(this: Pin<&mut Self>) {
            // A stream dropped before its end: the client went away. The attempt's own
            // drop counts it as cancelled; the request is counted as it was answered.
            let this = this.project();
            if let Some(record) = this.record.take() {
                record.finish(None);
            }
        }
    }
}

impl RelayBody {
    pub fn new(
        first: Frame<Bytes>,
        inner: Incoming,
        idle_timeout: Duration,
        attempt: Attempt,
        record: RequestRecord,
        ttfb: Duration,
        outcome: Outcome,
    ) -> RelayBody {
        RelayBody {
            first: Some(first),
            inner,
            idle: tokio::time::sleep(idle_timeout),
            idle_timeout,
            attempt: Some(attempt),
            record: Some(record),
            ttfb,
            outcome,
        }
    }
}

#[derive(Debug)]
pub struct StreamIdle(Duration);

impl std::fmt::Display for StreamIdle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "upstream stream was silent for {:?}", self.0)
    }
}

impl std::error::Error for StreamIdle {}

impl Body for RelayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if let Some(frame) = this.first.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let deadline = tokio::time::Instant::now() + *this.idle_timeout;
                this.idle.as_mut().reset(deadline);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                if let Some(a) = this.attempt.take() {
                    a.finish(*this.outcome, Some(*this.ttfb));
                }
                if let Some(r) = this.record.take() {
                    r.finish(Some(Instant::now()));
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(a) = this.attempt.take() {
                    a.finish(Outcome::ServerFailure, None);
                }
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Pending => {
                ready!(this.idle.as_mut().poll(cx));
                if let Some(a) = this.attempt.take() {
                    a.finish(Outcome::ServerFailure, None);
                }
                Poll::Ready(Some(Err(Box::new(StreamIdle(*this.idle_timeout)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
