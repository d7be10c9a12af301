use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, ServerName};
use switchyard_e2e::*;
use tokio::net::TcpStream;

/// Opens a TLS connection to the router offering `alpn`; returns the negotiated protocol.
async fn tls_connect(
    addr: std::net::SocketAddr,
    ca: CertificateDer<'static>,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake")
}

fn chat(uri: &str, version: Version) -> Request<Full<Bytes>> {
    let mut req = post_req(uri, chat_body("m", false));
    *req.version_mut() = version;
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_http1_and_http2_over_tls_and_h2c_on_plaintext() {
    let up = Upstream::start("u").await;
    let dir = TempDir::new();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.0.join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.0.join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
    let cfg = format!(
        "[admin]\naddr = \"127.0.0.1:0\"\n\n[[listeners]]\naddr = \"127.0.0.1:0\"\n\n[[listeners]]\naddr = \"127.0.0.1:0\"\ntls = {{ cert = \"cert.pem\", key = \"key.pem\" }}\n\n{}",
        model("m", &[&up], "")
    );
    let router = Router::start_in(dir, &cfg).await;
    assert_eq!(router.addrs[1].0, "https");
    let tls_addr = router.addrs[1].1;
    let ca = cert.cert.der().clone();

    // HTTP/2 over TLS (ALPN h2).
    let io = tls_connect(tls_addr, ca.clone(), b"h2").await;
    assert_eq!(io.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await.unwrap();
    tokio::spawn(conn);
    let res = h2.send_request(chat("https://localhost/v1/chat/completions", Version::HTTP_2)).await.unwrap();
    assert_eq!(res.version(), Version::HTTP_2);
    assert_eq!(res.status(), 200);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(json(&body)["object"], "chat.completion");

    // HTTP/1.1 over TLS.
    let io = tls_connect(tls_addr, ca, b"http/1.1").await;
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.unwrap();
    tokio::spawn(conn);
    let mut req = chat("/v1/chat/completions", Version::HTTP_11);
    req.headers_mut().insert("host", "localhost".parse().unwrap());
    let res = h1.send_request(req).await.unwrap();
    assert_eq!(res.version(), Version::HTTP_11);
    assert_eq!(res.status(), 200);

    // HTTP/2 with prior knowledge on the plaintext listener.
    let h2c = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).http2_only(true).build_http();
    let res = h2c.request(chat(&router.url("/v1/chat/completions"), Version::HTTP_2)).await.unwrap();
    assert_eq!(res.version(), Version::HTTP_2);
    assert_eq!(res.status(), 200);
    assert_eq!(up.hits(), 3);
}
