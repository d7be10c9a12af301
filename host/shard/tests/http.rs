//! End-to-end: the real binary as a 2-stage replica (the head spawns the tail stage).
//! One test function on purpose: the sections share one replica and must not overlap
//! (batching is asserted through the metrics; the last section kills the tail stage).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchyard_shard::model::read_gguf;
use switchyard_shard::tokenizer::Tokenizer;

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(shards: usize) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard-shard"))
        .args(["serve", "--listen", "127.0.0.1:0", "--respawn-backoff-ms", "1500", "--model"])
        .arg(common::model_path())
        .arg("--spawn-shards")
        .arg(shards.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start switchyard-shard");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if let Some(a) = line.strip_prefix("ready ") {
                let _ = tx.send(a.to_string());
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(120)).expect("head printed no `ready ADDR` line within 120 s");
    Server { child, addr }
}

struct Resp {
    status: u16,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(nl) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(std::str::from_utf8(&b[..nl]).unwrap().trim(), 16).unwrap_or(0);
        b = &b[nl + 2..];
        if size == 0 || b.len() < size {
            out.extend_from_slice(&b[..size.min(b.len())]);
            break;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[(size + 2).min(b.len())..];
    }
    out
}

fn request(addr: &str, method: &str, path: &str, body: Option<&str>, timeout: Duration) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    // An aborted stream may end with a reset; keep what arrived.
    let _ = s.read_to_end(&mut raw);
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("no HTTP header end");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let rest = &raw[split + 4..];
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_vec() };
    Resp { status, body: String::from_utf8_lossy(&body).into_owned() }
}

fn post(addr: &str, path: &str, v: &Value) -> Resp {
    request(addr, "POST", path, Some(&v.to_string()), Duration::from_secs(60))
}

fn get(addr: &str, path: &str) -> Resp {
    request(addr, "GET", path, None, Duration::from_secs(10))
}

fn complete(addr: &str, prompt: &str, max_tokens: usize) -> String {
    let r = post(addr, "/v1/completions", &json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}));
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["choices"][0]["text"].as_str().unwrap().to_string()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing"))
}

#[test]
fn two_stage_replica_end_to_end() {
    let t_all = Instant::now();
    let (ct, _) = read_gguf(&common::model_path()).unwrap();
    let tok = Tokenizer::from_gguf(&ct).unwrap();
    let srv = start(2);
    let addr = srv.addr.clone();
    assert_eq!(get(&addr, "/health").status, 200);
    assert_eq!(get(&addr, "/ready").status, 200);

    // Completion with real text and exact usage.
    let prompt = "The capital of France is";
    let r = post(&addr, "/v1/completions", &json!({"prompt": prompt, "max_tokens": 8, "temperature": 0}));
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let text = v["choices"][0]["text"].as_str().unwrap();
    eprintln!("completion: {text:?}");
    assert!(text.contains("Paris"), "expected real text, got {text:?}");
    assert_eq!(v["object"], "text_completion");
    let u = &v["usage"];
    let n_prompt = tok.encode(prompt, true).len() as u64;
    assert_eq!(u["prompt_tokens"].as_u64().unwrap(), n_prompt);
    let n_completion = u["completion_tokens"].as_u64().unwrap();
    match v["choices"][0]["finish_reason"].as_str().unwrap() {
        "length" => assert_eq!(n_completion, 8),
        "stop" => assert!(n_completion <= 8),
        other => panic!("finish_reason {other}"),
    }
    assert_eq!(u["total_tokens"].as_u64().unwrap(), n_prompt + n_completion);

    // Chat, streamed: chunks, then [DONE]; the streamed text equals the non-streamed one.
    let chat = json!({"messages": [{"role": "user", "content": "Say hello in one short sentence."}],
                      "max_tokens": 12, "temperature": 0});
    let plain = post(&addr, "/v1/chat/completions", &chat);
    assert_eq!(plain.status, 200, "{}", plain.body);
    let pv = plain.json();
    assert_eq!(pv["object"], "chat.completion");
    let want = pv["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(!want.trim().is_empty());
    let mut sreq = chat.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let s = post(&addr, "/v1/chat/completions", &sreq);
    assert_eq!(s.status, 200);
    let events: Vec<&str> = s.body.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(*events.last().unwrap(), "data: [DONE]", "stream: {}", s.body);
    let mut got = String::new();
    let mut finish = None;
    let mut usage = None;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e.strip_prefix("data: ").expect("SSE data line")).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        if let Some(c) = v["choices"].get(0) {
            got.push_str(c["delta"]["content"].as_str().unwrap_or(""));
            if !c["finish_reason"].is_null() {
                finish = Some(c["finish_reason"].as_str().unwrap().to_string());
            }
        }
        if !v["usage"].is_null() {
            usage = Some(v["usage"].clone());
        }
    }
    assert!(events.len() > 3, "expected several chunks");
    assert_eq!(got, want);
    assert!(finish.is_some());
    assert_eq!(usage.unwrap(), pv["usage"]);

    // Sampling at random happens in the tail here, with the head's seeded draws: a seeded
    // request gives the same text as from a single-process replica.
    let sampled = json!({"prompt": "My favourite animal is", "max_tokens": 12, "temperature": 0.9,
                         "top_p": 0.95, "seed": 7});
    let text_of =
        |a: &str| post(a, "/v1/completions", &sampled).json()["choices"][0]["text"].as_str().unwrap().to_string();
    let two_stages = text_of(&addr);
    let one_stage = {
        let single = start(1);
        text_of(&single.addr)
    };
    eprintln!("sampled: {two_stages:?}");
    assert_eq!(two_stages, one_stage, "seeded sampling must not depend on the number of stages");
    assert_eq!(text_of(&addr), two_stages, "the same seed gives the same text");

    // Streamed plain completion.
    let s =
        post(&addr, "/v1/completions", &json!({"prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": true}));
    assert!(s.body.contains("\"object\":\"text_completion\"") && s.body.ends_with("data: [DONE]\n\n"), "{}", s.body);

    // Continuation (vLLM's continue_final_message) = completion of the same rendered prompt.
    let cont = json!({"messages": [{"role": "user", "content": "List the first letters of the alphabet."},
                                   {"role": "assistant", "content": "A, B, C,"}],
                      "continue_final_message": true, "add_generation_prompt": false,
                      "max_tokens": 6, "temperature": 0});
    let r = post(&addr, "/v1/chat/completions", &cont);
    assert_eq!(r.status, 200, "{}", r.body);
    let cont_text = r.json()["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let raw = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
               <|im_start|>user\nList the first letters of the alphabet.<|im_end|>\n<|im_start|>assistant\nA, B, C,";
    eprintln!("continuation: {cont_text:?}");
    assert_eq!(cont_text, complete(&addr, raw, 6));
    assert!(cont_text.contains('D'), "continuation should go on with D: {cont_text:?}");

    // Stop strings.
    let r = post(
        &addr,
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 8, "temperature": 0, "stop": ["Paris"]}),
    );
    let v = r.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(!v["choices"][0]["text"].as_str().unwrap().contains("Paris"));

    // Errors: malformed JSON, prompt beyond the context window.
    let r = request(&addr, "POST", "/v1/completions", Some("{not json"), Duration::from_secs(10));
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    let long = "hello ".repeat(9000);
    let r = post(&addr, "/v1/completions", &json!({"prompt": long, "max_tokens": 4}));
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("context length"), "{}", r.body);

    // Continuous batching: concurrent greedy answers equal the sequential ones, and the
    // metrics saw steps with more than one sequence.
    let prompts = ["Once upon a time", "The best way to learn Rust is", "Water boils at", "My favourite colour is"];
    let sequential: Vec<String> = prompts.iter().map(|p| complete(&addr, p, 10)).collect();
    let before = get(&addr, "/metrics").body;
    let multi_before = metric(&before, "switchyard_shard_batch_size_count")
        - metric(&before, "switchyard_shard_batch_size_bucket{le=\"1\"}");
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (a, p) = (addr.clone(), p.to_string());
            std::thread::spawn(move || complete(&a, &p, 10))
        })
        .collect();
    let concurrent: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(concurrent, sequential);
    let m = get(&addr, "/metrics").body;
    let multi =
        metric(&m, "switchyard_shard_batch_size_count") - metric(&m, "switchyard_shard_batch_size_bucket{le=\"1\"}");
    assert!(multi > multi_before, "no step with batch size > 1 observed:\n{m}");
    assert!(metric(&m, "switchyard_shard_tokens_generated_total") > 0.0);
    assert!(m.contains("switchyard_shard_time_to_first_token_seconds_bucket"));
    assert!(m.contains("switchyard_shard_queue_depth"));
    assert!(m.contains("switchyard_shard_tokens_per_second"));

    // Kill the tail stage during a request: the request fails fast with a 5xx, /ready goes
    // 503, and after the head restarts the stage the replica is ready and serving again.
    let health = get(&addr, "/health").json();
    let pid = health["stages"][0]["pid"].as_u64().expect("tail pid in /health");
    let a2 = addr.clone();
    let inflight = std::thread::spawn(move || {
        let r = post(
            &a2,
            "/v1/completions",
            // Counting never reaches an end-of-text token, so this runs for the whole budget.
            &json!({"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 400, "temperature": 0}),
        );
        (r.status, Instant::now())
    });
    // Kill only once the sequence is decoding (a fixed sleep raced a fast machine).
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&get(&addr, "/metrics").body, "switchyard_shard_active_sequences") < 1.0 {
        assert!(Instant::now() < deadline, "the long request never joined the batch");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let killed_at = Instant::now();
    assert!(Command::new("kill").arg("-9").arg(pid.to_string()).status().unwrap().success());
    let (status, at) = inflight.join().unwrap();
    assert!((500..600).contains(&status), "in-flight request got {status}");
    assert!(at.duration_since(killed_at) < Duration::from_secs(3), "failure took {:?}", at.duration_since(killed_at));
    assert_eq!(get(&addr, "/ready").status, 503);
    let r = post(&addr, "/v1/completions", &json!({"prompt": "hi", "max_tokens": 2}));
    assert_eq!(r.status, 503, "{}", r.body);
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(&addr, "/ready").status != 200 {
        assert!(Instant::now() < deadline, "replica did not become ready again");
        std::thread::sleep(Duration::from_millis(100));
    }
    let new_pid = get(&addr, "/health").json()["stages"][0]["pid"].as_u64().unwrap();
    assert_ne!(new_pid, pid);
    assert_eq!(complete(&addr, prompts[2], 10), sequential[2]);
    eprintln!("end-to-end test took {:?}", t_all.elapsed());
}
