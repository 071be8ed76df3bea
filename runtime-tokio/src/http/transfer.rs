//! Moving one request body up and one response down, cut where the core's framing says
//! each message ends.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dialback_core::http::body::{response_framing, BodyState, Framing};
use dialback_core::http::head::{parse_response, Headers, Limits, RequestHead};
use dialback_core::http::rewrite::response_head;
use dialback_core::http::route::Route;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tracing::debug;

use crate::deadline::Deadline;
use crate::metrics::ConnectionGuard;

/// Room made for each read while a head is expected: heads are small, and many idle
/// connections wait for one.
pub(super) const HEAD_CHUNK: usize = 4 * 1024;
/// Room made for each read of a body.
pub(super) const BODY_CHUNK: usize = 64 * 1024;
/// Body bytes sent in the same write as the response head, at most.
pub(super) const COALESCE: usize = 16 * 1024;
/// A buffer larger than this is shrunk after each exchange.
pub(super) const IDLE_BUF: usize = 16 * 1024;
/// Response heads from services may be larger than what clients may send (cookies, CSP).
pub(super) const RESPONSE_LIMITS: Limits = Limits {
    max_head: 64 * 1024,
    max_headers: 200,
};

/// Why a response could not be passed on.
pub(super) enum RespError {
    /// The service closed before sending anything: a kept connection that went stale.
    Nothing,
    /// Anything else; `sent` says whether part of the response already reached the client.
    Failed {
        status: u16,
        why: String,
        sent: bool,
    },
}

/// Reads more bytes into `buf`, making room for `want` more; `Ok(0)` at EOF.
pub(super) async fn read_more<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut Vec<u8>,
    want: usize,
) -> io::Result<usize> {
    buf.reserve(want);
    rd.read_buf(buf).await
}

/// Gives back the room a large body needed, so an idle kept-alive connection holds little
/// memory.
pub(super) fn shrink(buf: &mut Vec<u8>) {
    if buf.capacity() > IDLE_BUF {
        buf.shrink_to(buf.len().max(IDLE_BUF / 4));
    }
}

/// How a response ended.
pub(super) enum Passed {
    Done { service_closes: bool, status: u16 },
    Upgraded,
}

/// Passes the request body from the client to the service, as far as `body` says it goes.
pub(super) async fn send_body<R, W>(
    rd: &mut R,
    buf: &mut Vec<u8>,
    wr: &mut W,
    body: &mut BodyState,
    traffic: Option<&ConnectionGuard>,
    (deadline, idle): (&mut Deadline, Duration),
) -> Result<(), String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let n = body.advance(buf).map_err(|e| e.to_string())?;
        if n > 0 {
            wr.write_all(&buf[..n])
                .await
                .map_err(|e| format!("cannot send the request body: {e}"))?;
            buf.drain(..n);
            if let Some(t) = traffic {
                t.add_up(n as u64);
            }
        }
        if body.is_done() {
            return wr
                .flush()
                .await
                .map_err(|e| format!("cannot send the request body: {e}"));
        }
        let at = tokio::time::Instant::now() + idle;
        match deadline.run(at, read_more(rd, buf, BODY_CHUNK)).await {
            Ok(Ok(0)) => return Err("the client closed in the middle of the request body".into()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("reading the request body failed: {e}")),
            Err(_) => return Err(format!("the request body stalled for {idle:?}")),
        }
    }
}

/// Reads the service's response head (after any interim `1xx`), sends it rewritten to the
/// client, then passes the body.
#[allow(clippy::too_many_arguments)]
pub(super) async fn pass_response<R, W>(
    rd: &mut R,
    buf: &mut Vec<u8>,
    wr: &mut W,
    request: &RequestHead,
    route: &Route,
    https: bool,
    traffic: Option<&ConnectionGuard>,
    (timer, response_timeout): (&mut Deadline, Duration),
    started: &AtomicBool,
    uploaded: &Notify,
    body_pending: bool,
) -> Result<Passed, RespError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let service = &route.service;
    let mut sent = false;
    let failed = |status: u16, why: String, sent: bool| RespError::Failed { status, why, sent };
    let host = request.get("host").map(str::to_owned);
    // The service has response_timeout to answer once it has the whole request; while the
    // body is still going up, the upload's own stall timeout applies.
    let mut deadline = (!body_pending).then(|| Instant::now() + response_timeout);
    loop {
        let (head, len) = loop {
            match parse_response(buf, &RESPONSE_LIMITS) {
                Ok(Some(parsed)) => break parsed,
                Ok(None) => {}
                Err(why) => return Err(failed(502, format!("service {service}: {why}"), sent)),
            }
            let read = match deadline {
                Some(d) => timer.run(d.into(), read_more(rd, buf, HEAD_CHUNK)).await,
                None => tokio::select! {
                    r = read_more(rd, buf, HEAD_CHUNK) => Ok(r),
                    _ = uploaded.notified() => {
                        deadline = Some(Instant::now() + response_timeout);
                        continue;
                    }
                },
            };
            match read {
                Ok(Ok(0)) if buf.is_empty() && !sent => return Err(RespError::Nothing),
                Ok(Ok(0)) => {
                    return Err(failed(
                        502,
                        format!("service {service} closed in the middle of a response head"),
                        sent,
                    ))
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) if buf.is_empty() && !sent => {
                    debug!(%service, "reading from the service failed: {e}");
                    return Err(RespError::Nothing);
                }
                Ok(Err(e)) => {
                    return Err(failed(
                        502,
                        format!("reading from service {service} failed: {e}"),
                        sent,
                    ))
                }
                Err(_) => {
                    return Err(failed(
                        504,
                        format!("service {service} did not answer within {response_timeout:?}"),
                        sent,
                    ))
                }
            }
        };
        buf.drain(..len);
        let framing = response_framing(&request.method, &head)
            .map_err(|why| failed(502, format!("service {service}: {why}"), sent))?;
        let mut out = response_head(&head, route, host.as_deref(), https);
        let head_len = out.len();
        let final_response = framing != Framing::Upgrade && !(100..200).contains(&head.status);
        let mut body = BodyState::new(if final_response {
            framing
        } else {
            Framing::Empty
        });
        // The part of the body already read goes out with the head, in one write: a small
        // response then costs one segment instead of two.
        let n = body
            .advance(&buf[..buf.len().min(COALESCE)])
            .map_err(|e| failed(502, format!("service {service}: {e}"), sent))?;
        out.extend_from_slice(&buf[..n]);
        buf.drain(..n);
        started.store(true, Ordering::Relaxed);
        wr.write_all(&out)
            .await
            .map_err(|e| failed(502, format!("the client went away: {e}"), true))?;
        sent = true;
        if let Some(t) = traffic {
            t.add_down(head_len as u64 + n as u64);
        }
        if framing == Framing::Upgrade {
            wr.flush()
                .await
                .map_err(|e| failed(502, format!("the client went away: {e}"), true))?;
            return Ok(Passed::Upgraded);
        }
        if (100..200).contains(&head.status) {
            // Interim (100 Continue, 103 Early Hints): the real response follows.
            wr.flush()
                .await
                .map_err(|e| failed(502, format!("the client went away: {e}"), true))?;
            continue;
        }
        loop {
            let n = body
                .advance(buf)
                .map_err(|e| failed(502, format!("service {service}: {e}"), true))?;
            if n > 0 {
                wr.write_all(&buf[..n])
                    .await
                    .map_err(|e| failed(502, format!("the client went away: {e}"), true))?;
                buf.drain(..n);
                if let Some(t) = traffic {
                    t.add_down(n as u64);
                }
            }
            if body.is_done() {
                break;
            }
            match read_more(rd, buf, BODY_CHUNK).await {
                Ok(0) if body.ends_at_eof() => {
                    wr.flush()
                        .await
                        .map_err(|e| failed(502, format!("the client went away: {e}"), true))?;
                    return Ok(Passed::Done {
                        service_closes: true,
                        status: head.status,
                    });
                }
                Ok(0) => {
                    return Err(failed(
                        502,
                        format!("service {service} closed in the middle of a response body"),
                        true,
                    ))
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(failed(
                        502,
                        format!("reading from service {service} failed: {e}"),
                        true,
                    ))
                }
            }
        }
        wr.flush()
            .await
            .map_err(|e| failed(502, format!("the client went away: {e}"), true))?;
        return Ok(Passed::Done {
            service_closes: head.closes(),
            status: head.status,
        });
    }
}
