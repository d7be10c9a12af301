mod common;

use switchyard_shard::model::read_gguf;
use switchyard_shard::tokenizer::{StreamDecoder, Tokenizer};

fn tokenizer() -> Tokenizer {
    let (ct, _) = read_gguf(&common::model_path()).unwrap();
    Tokenizer::from_gguf(&ct).unwrap()
}

#[test]
fn round_trips_and_special_tokens() {
    let tok = tokenizer();
    assert_eq!(tok.vocab_size(), 49152);
    let samples = [
        "Hello world",
        "Hello, how are you today?",
        "  leading and trailing spaces  ",
        "I'm sure they'll've said it's OK'd",
        "numbers: 3.14159, 2024 and 1,000,000",
        "naïve café — 東京 🚀 Ωmega",
        "fn main() {\n    println!(\"hi\");\n}\n\n\ttabs\r\n",
        "<|im_start|> looks special but is text here",
        "",
    ];
    for s in samples {
        let ids = tok.encode(s, false);
        assert_eq!(tok.decode(&ids, false), s, "round trip of {s:?} via {ids:?}");
        // Streaming decode gives the same text.
        let mut d = StreamDecoder::default();
        let mut out: String = ids.iter().map(|&id| d.push(&tok, id)).collect();
        out.push_str(&d.finish());
        assert_eq!(out, s);
    }
    // The first word is a single token (candle's helper gets this wrong for SmolLM2).
    let ids = tok.encode("Hello world", true);
    assert_eq!(ids, vec![tok.token_id("Hello").unwrap(), tok.token_id("Ġworld").unwrap()]);
    // Digits are split one by one (the model's Digits pre-tokenizer).
    let ids = tok.encode("2024", true);
    assert_eq!(ids.len(), 4);

    // Special tokens are atomic in a chat prompt ...
    let im_start = tok.token_id("<|im_start|>").unwrap();
    let im_end = tok.token_id("<|im_end|>").unwrap();
    assert_eq!((im_start, im_end), (1, 2));
    assert_eq!(tok.eos_id, 2);
    let prompt =
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n";
    let ids = tok.encode(prompt, true);
    assert_eq!(ids[0], im_start);
    assert_eq!(ids.iter().filter(|&&i| i == im_start).count(), 3);
    assert_eq!(ids.iter().filter(|&&i| i == im_end).count(), 2);
    assert_eq!(tok.decode(&ids, false), prompt);
    // ... but skipped when decoding output, and plain text when specials are not allowed.
    assert_eq!(tok.decode(&ids, true), "system\nYou are helpful.\nuser\nHi!\nassistant\n");
    assert!(!tok.encode(prompt, false).contains(&im_start));
    assert!(tok.chat_template.as_deref().unwrap_or("").contains("<|im_start|>"));
}

/// Ids produced by Hugging Face `tokenizers` with the model's pipeline (see the JSON's
/// `source`) for strings covering contractions, digits, whitespace runs, Unicode and
/// special tokens.
#[test]
fn matches_hugging_face_tokenizers() {
    let tok = tokenizer();
    let golden: serde_json::Value = serde_json::from_str(include_str!("data/tokenizer_golden.json")).unwrap();
    for case in golden["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(text, true), want, "ids of {text:?}");
        assert_eq!(tok.decode(&want, false), text);
    }
}
