//! The stand-in model server: fixed bodies, no allocation per request beyond hyper's own.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const CHAT_BODY: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! This is a fixed benchmark reply."},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":9,"total_tokens":18}}"#;

const TEXT_BODY: &str = r#"{"id":"cmpl-bench","object":"text_completion","created":1700000000,"model":"bench","choices":[{"index":0,"text":"Hello! This is a fixed benchmark reply.","logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":9,"total_tokens":10}}"#;

const MODELS_BODY: &str =
    r#"{"object":"list","data":[{"id":"bench","object":"model","created":1700000000,"owned_by":"loadgen"}]}"#;

pub async fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    // Line-buffered: the benchmark script waits for this line to learn the port.
    println!("listening on http://{}", listener.local_addr()?);
    let mut builder = http1::Builder::new();
    builder.keep_alive(true);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Usually EMFILE under a connection storm; back off instead of spinning.
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = builder.serve_connection(TokioIo::new(stream), service_fn(handle));
        tokio::spawn(async move {
            // Peers resetting connections at the end of a run is normal; stay quiet.
            let _ = conn.await;
        });
    }
}

fn reply(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = match (req.method(), req.uri().path()) {
        (&Method::POST, "/v1/chat/completions") => CHAT_BODY,
        (&Method::POST, "/v1/completions") => TEXT_BODY,
        (&Method::GET, "/health") => return Ok(reply(StatusCode::OK, r#"{"status":"ok"}"#)),
        (&Method::GET, "/v1/models") => return Ok(reply(StatusCode::OK, MODELS_BODY)),
        _ => {
            return Ok(reply(
                StatusCode::NOT_FOUND,
                r#"{"error":{"message":"not found","type":"invalid_request_error"}}"#,
            ));
        }
    };
    // Read the request body to its end so the connection stays reusable.
    if req.into_body().collect().await.is_err() {
        return Ok(reply(
            StatusCode::BAD_REQUEST,
            r#"{"error":{"message":"bad body","type":"invalid_request_error"}}"#,
        ));
    }
    Ok(reply(StatusCode::OK, body))
}
