//! Response bodies. A relayed stream passes each upstream frame to the client as it
//! arrives (no buffering), bounds the silence between frames, and reports the attempt's
//! outcome and the request's metrics when the stream ends, fails or is dropped.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use crate::client::PooledBody;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use tokio::time::Sleep;

use crate::outcome::RequestRecord;
use crate::resume::{ResumeContext, Resumed, Splice, SseLog, continuation, resume};
use crate::upstream::{Attempt, Outcome};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ResBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> Full<Bytes> {
    Full::new(bytes.into())
}

pub fn boxed_full(bytes: impl Into<Bytes>) -> ResBody {
    full(bytes).map_err(|never| match never {}).boxed_unsync()
}

/// Why a body could not be read whole.
#[derive(Debug)]
pub enum CollectError<E> {
    /// More than the limit: nothing past it was kept.
    TooLarge,
    Body(E),
}

/// A whole body of at most `limit` bytes. A body that arrives as one frame (a request or a
/// non-streamed answer that came in one read) is returned as that frame, without a copy or
/// an allocation; more frames are joined. Trailers are dropped.
pub async fn collect_limited<B>(body: B, limit: usize) -> Result<Bytes, CollectError<B::Error>>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut body = body;
    let mut first: Option<Bytes> = None;
    let mut joined: Option<bytes::BytesMut> = None;
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(CollectError::Body)?.into_data() else { continue };
        len += data.len();
        if len > limit {
            return Err(CollectError::TooLarge);
        }
        match (&mut first, &mut joined) {
            (_, Some(j)) => j.extend_from_slice(&data),
            (Some(f), None) => {
                // Room for what the body says is still to come, never past the limit.
                let rest = usize::try_from(body.size_hint().lower()).unwrap_or(usize::MAX);
                let mut j = bytes::BytesMut::with_capacity(len.saturating_add(rest).min(limit));
                j.extend_from_slice(f);
                j.extend_from_slice(&data);
                joined = Some(j);
            }
            (None, None) => first = Some(data),
        }
    }
    Ok(match (joined, first) {
        (Some(j), _) => j.freeze(),
        (None, Some(f)) => f,
        (None, None) => Bytes::new(),
    })
}

pin_project_lite::pin_project! {
    pub struct RelayBody {
        first: Option<Frame<Bytes>>,
        inner: PooledBody,
        #[pin]
        idle: Sleep,
        idle_timeout: Duration,
        attempt: Option<Attempt>,
        record: Option<RequestRecord>,
        ttfb: Duration,
        outcome: Outcome,
        // Mid-stream failover, when enabled for the model.
        resume: Option<Box<Resumable>>,
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

/// A stream that may continue on another endpoint (see `resume.rs`).
pub struct Resumable {
    ctx: ResumeContext,
    log: SseLog,
    first_byte: Duration,
    /// The continuation being set up.
    pending: Option<Resumed>,
    /// Set once the stream runs on a continuation.
    splice: Option<Splice>,
}

impl Resumable {
    pub fn new(ctx: ResumeContext, first_byte: Duration) -> Box<Resumable> {
        Box::new(Resumable { ctx, log: SseLog::default(), first_byte, pending: None, splice: None })
    }

    /// Passes a frame's data through the event log (and the splice, after a failover).
    fn accept(&mut self, data: Bytes) -> Bytes {
        let whole = self.log.cut(data);
        let out = match &self.splice {
            Some(s) if !whole.is_empty() => s.rewrite(whole),
            _ => whole,
        };
        self.log.observe(&out);
        out
    }

    /// After an upstream failure: starts a continuation if the stream can go on.
    /// `Err(Some(bytes))`: nothing to continue, only the end of the stream was missing.
    fn start(&mut self, model: &ModelMetricsHandle) -> Result<(), Option<Bytes>> {
        if self.ctx.left == 0 || self.log.done {
            return Err(None);
        }
        match continuation(&self.ctx.body, self.ctx.chat, &self.log) {
            None => Err(None),
            Some(None) => Err(Some(Bytes::from_static(b"data: [DONE]\n\n"))),
            Some(Some(body)) => {
                model.resumes.inc();
                self.ctx.left -= 1;
                self.pending = Some(resume(&mut self.ctx, body, self.first_byte));
                Ok(())
            }
        }
    }
}

type ModelMetricsHandle = crate::outcome::ModelMetrics;

/// A stream that reached its end: settles the tenant's token charge from what the event
/// log saw (usage, or one token per content event), then counts the request.
fn finish_stream(record: &mut Option<RequestRecord>, resume: Option<&Resumable>) {
    let Some(mut rec) = record.take() else { return };
    if let Some(r) = resume
        && rec.counts_tokens()
    {
        rec.settle_stream(r.log.usage_total, r.log.content_events);
    }
    rec.finish(Some(Instant::now()));
}

impl RelayBody {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        first: Frame<Bytes>,
        inner: PooledBody,
        idle_timeout: Duration,
        attempt: Attempt,
        record: RequestRecord,
        ttfb: Duration,
        outcome: Outcome,
        resume: Option<Box<Resumable>>,
    ) -> RelayBody {
        let mut body = RelayBody {
            first: None,
            inner,
            idle: tokio::time::sleep(idle_timeout),
            idle_timeout,
            attempt: Some(attempt),
            record: Some(record),
            ttfb,
            outcome,
            resume,
        };
        body.first = Some(match (&mut body.resume, first.into_data()) {
            (Some(r), Ok(data)) => Frame::data(r.accept(data)),
            (None, Ok(data)) => Frame::data(data),
            (_, Err(frame)) => frame,
        });
        body
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
        if let Some(frame) = this.first.take()
            && frame.data_ref().is_none_or(|d| !d.is_empty())
        {
            return Poll::Ready(Some(Ok(frame)));
        }
        loop {
            // A continuation being set up on another endpoint.
            if let Some(r) = this.resume.as_mut()
                && let Some(fut) = r.pending.as_mut()
            {
                let resumed = ready!(fut.as_mut().poll(cx));
                r.pending = None;
                let Some((inner, attempt)) = resumed else {
                    return Poll::Ready(Some(Err(
                        "the stream's upstream failed and no endpoint could continue it".into()
                    )));
                };
                tracing::debug!(endpoint = %attempt.endpoint().name, delivered = r.log.content_events, "stream resumed");
                *this.inner = inner;
                *this.attempt = Some(attempt);
                r.splice = Some(Splice { id: r.log.id.clone() });
                this.idle.as_mut().reset(tokio::time::Instant::now() + *this.idle_timeout);
            }
            let failure: BoxError = match Pin::new(&mut *this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let deadline = tokio::time::Instant::now() + *this.idle_timeout;
                    this.idle.as_mut().reset(deadline);
                    let Some(r) = this.resume.as_mut() else { return Poll::Ready(Some(Ok(frame))) };
                    match frame.into_data() {
                        Ok(data) => {
                            let out = r.accept(data);
                            if out.is_empty() {
                                continue;
                            }
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    }
                }
                Poll::Ready(None) => {
                    if let Some(a) = this.attempt.take() {
                        a.finish(*this.outcome, Some(*this.ttfb));
                    }
                    let rest = this.resume.as_mut().map(|r| r.log.flush()).unwrap_or_default();
                    finish_stream(this.record, this.resume.as_deref());
                    if !rest.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(rest))));
                    }
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(e))) => e.into(),
                Poll::Pending => {
                    ready!(this.idle.as_mut().poll(cx));
                    Box::new(StreamIdle(*this.idle_timeout))
                }
            };
            if let Some(a) = this.attempt.take() {
                let name = a.endpoint().index as u32;
                a.finish(Outcome::ServerFailure, None);
                if let Some(r) = this.resume.as_mut() {
                    r.ctx.tried.push(name);
                }
            }
            let Some(r) = this.resume.as_mut() else { return Poll::Ready(Some(Err(failure))) };
            if r.log.done {
                // The upstream failed after its `[DONE]`: the client has the whole stream.
                finish_stream(this.record, Some(r));
                return Poll::Ready(None);
            }
            let metrics = this.record.as_ref().map(|rec| rec.metrics());
            match metrics.map(|m| r.start(m)) {
                Some(Ok(())) => continue,
                Some(Err(Some(end))) => {
                    // Everything was delivered but the end: finish the stream ourselves.
                    r.log.done = true;
                    finish_stream(this.record, Some(r));
                    return Poll::Ready(Some(Ok(Frame::data(end))));
                }
                _ => return Poll::Ready(Some(Err(failure))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none()
            && self.resume.as_ref().is_none_or(|r| r.pending.is_none() && !r.log.holds_partial())
            && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body that yields the given frames, each ready at once.
    struct Frames(std::collections::VecDeque<Result<Bytes, std::io::Error>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|r| r.map(Frame::data)))
        }
    }

    fn frames(parts: &[&'static [u8]]) -> Frames {
        Frames(parts.iter().map(|p| Ok(Bytes::from_static(p))).collect())
    }

    #[tokio::test]
    async fn collect_limited_keeps_one_frame_as_is_joins_several_and_stops_at_the_limit() {
        static ONE: &[u8] = b"{\"model\":\"m\"}";
        let got = collect_limited(frames(&[ONE]), 64).await.unwrap();
        assert_eq!(got, ONE);
        assert_eq!(got.as_ptr(), ONE.as_ptr(), "one frame is returned without a copy");

        let got = collect_limited(frames(&[b"ab", b"", b"cd", b"e"]), 5).await.unwrap();
        assert_eq!(got, "abcde");
        assert_eq!(collect_limited(frames(&[]), 5).await.unwrap(), "");

        assert!(matches!(collect_limited(frames(&[b"abc", b"def"]), 5).await, Err(CollectError::TooLarge)));
        assert!(matches!(collect_limited(frames(&[b"abcdef"]), 5).await, Err(CollectError::TooLarge)));

        let failing = Frames([Ok(Bytes::from_static(b"a")), Err(std::io::Error::other("reset"))].into());
        assert!(matches!(collect_limited(failing, 5).await, Err(CollectError::Body(e)) if e.to_string() == "reset"));
    }
}
