//! CLIP tokenizer against ids recorded from transformers 5.23.0 `CLIPTokenizer`
//! (tests/reference/tokenizer_cases.py writes tests/fixtures/tokenizer/cases.json).

use std::path::Path;

use sdgen::tokenizer::{ClipTokenizer, MAX_LEN};
use serde::Deserialize;

const BOS: u32 = 49406;
const EOS: u32 = 49407;

#[derive(Deserialize)]
struct Case {
    prompt: String,
    ids: Vec<u32>,
    tokens: Vec<u32>,
    dropped: Option<String>,
}

fn cases() -> Vec<Case> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/cases.json");
    let text = std::fs::read_to_string(&path).expect("reading cases.json");
    serde_json::from_str(&text).expect("parsing cases.json")
}

/// Checks every recorded case; returns how many there were.
fn check_all(tok: &ClipTokenizer) -> usize {
    let cases = cases();
    let mut failures = Vec::new();
    for case in &cases {
        let encoded = tok.encode_padded(&case.prompt);
        let tokens = tok.encode(&case.prompt);
        if encoded.ids != case.ids || tokens != case.tokens || encoded.dropped != case.dropped {
            failures.push(format!(
                "{:?}\n  expected {:?} dropped {:?}\n  got      {:?} dropped {:?}",
                case.prompt, case.tokens, case.dropped, tokens, encoded.dropped
            ));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
    cases.len()
}

#[test]
fn embedded_matches_transformers() {
    let tok = ClipTokenizer::embedded().unwrap();
    assert!(check_all(&tok) >= 120);
}

#[test]
fn photo_of_a_cat() {
    let tok = ClipTokenizer::embedded().unwrap();
    let encoded = tok.encode_padded("a photo of a cat");
    assert_eq!(encoded.ids.len(), MAX_LEN);
    assert_eq!(&encoded.ids[..7], &[BOS, 320, 1125, 539, 320, 2368, EOS]);
    assert!(encoded.ids[7..].iter().all(|&id| id == EOS));
    assert_eq!(encoded.dropped, None);
    assert_eq!(tok.encode("a photo of a cat"), vec![320, 1125, 539, 320, 2368]);
}

#[test]
fn pad_id() {
    let tok = ClipTokenizer::embedded().unwrap().with_pad_id(0);
    let ids = tok.encode_padded("a photo of a cat").ids;
    assert_eq!(&ids[..7], &[BOS, 320, 1125, 539, 320, 2368, EOS]);
    assert!(ids[7..].iter().all(|&id| id == 0));
    let empty = tok.encode_padded("").ids;
    assert_eq!(&empty[..2], &[BOS, EOS]);
    assert!(empty[2..].iter().all(|&id| id == 0));
    assert_eq!(empty.len(), MAX_LEN);
}

#[test]
fn dropped_words_are_reported() {
    let tok = ClipTokenizer::embedded().unwrap();
    let fits = format!("{}last", "word ".repeat(74));
    let encoded = tok.encode_padded(&fits);
    assert_eq!(encoded.dropped, None);
    assert_eq!(encoded.ids[MAX_LEN - 1], EOS);

    let long = format!("{}a red fox jumps over the lazy dog", "word ".repeat(74));
    let encoded = tok.encode_padded(&long);
    assert_eq!(encoded.ids.len(), MAX_LEN);
    assert_eq!(encoded.ids[0], BOS);
    assert_eq!(encoded.ids[MAX_LEN - 1], EOS);
    assert_eq!(encoded.ids[MAX_LEN - 2], tok.encode("a")[0]);
    assert_eq!(encoded.dropped.as_deref(), Some("red fox jumps over the lazy dog"));
}

/// The vocabulary (index = id) and merges derived from the embedded file, to write out as a
/// diffusers `tokenizer/` folder.
struct Files {
    vocab: Vec<String>,
    merges: Vec<(String, String)>,
}

fn files_from_embedded() -> Files {
    use std::io::Read;
    let gz = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/bpe_simple_vocab_16e6.txt.gz")).unwrap();
    let mut text = String::new();
    flate2::read::GzDecoder::new(&gz[..]).read_to_string(&mut text).unwrap();
    let merges: Vec<(String, String)> = text
        .split('\n')
        .skip(1)
        .take(49152 - 256 - 2)
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap();
            (a.to_string(), b.to_string())
        })
        .collect();
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut chars: Vec<char> = (0..256u32).filter(|&b| printable(b)).map(|b| char::from_u32(b).unwrap()).collect();
    chars.extend((256..256 + 68u32).map(|c| char::from_u32(c).unwrap()));
    assert_eq!(chars.len(), 256);
    let mut vocab: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
    vocab.extend(chars.iter().map(|c| format!("{c}</w>")));
    vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    vocab.push("<|startoftext|>".into());
    vocab.push("<|endoftext|>".into());
    Files { vocab, merges }
}

fn vocab_json(files: &Files) -> serde_json::Value {
    files
        .vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), serde_json::Value::from(i)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

#[test]
fn from_dir_vocab_and_merges() {
    let files = files_from_embedded();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vocab.json"), serde_json::to_string(&vocab_json(&files)).unwrap()).unwrap();
    let mut merges = String::from("#version: 0.2\n");
    for (a, b) in &files.merges {
        merges.push_str(&format!("{a} {b}\n"));
    }
    std::fs::write(dir.path().join("merges.txt"), merges).unwrap();

    let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
    check_all(&tok);

    // Stable Diffusion 2.x style: the pad token is "!" (id 0).
    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"pad_token": "!", "model_max_length": 77}"#).unwrap();
    let ids = ClipTokenizer::from_dir(dir.path()).unwrap().encode_padded("a cat").ids;
    assert_eq!(&ids[..4], &[BOS, 320, 2368, EOS]);
    assert!(ids[4..].iter().all(|&id| id == 0));

    // The legacy special_tokens_map.json overrides tokenizer_config.json (an object this time).
    std::fs::write(
        dir.path().join("special_tokens_map.json"),
        r#"{"pad_token": {"content": "<|endoftext|>", "lstrip": false}}"#,
    )
    .unwrap();
    let ids = ClipTokenizer::from_dir(dir.path()).unwrap().encode_padded("a cat").ids;
    assert!(ids[4..].iter().all(|&id| id == EOS));
}

#[test]
fn from_dir_tokenizer_json() {
    let files = files_from_embedded();
    for (i, array_merges) in [false, true].into_iter().enumerate() {
        let merges: Vec<serde_json::Value> = files
            .merges
            .iter()
            .map(|(a, b)| if array_merges { serde_json::json!([a, b]) } else { serde_json::json!(format!("{a} {b}")) })
            .collect();
        let json = serde_json::json!({
            "version": "1.0",
            "added_tokens": [
                {"id": 49406, "content": "<|startoftext|>", "special": true},
                {"id": 49407, "content": "<|endoftext|>", "special": true}
            ],
            "model": {
                "type": "BPE",
                "end_of_word_suffix": "</w>",
                "vocab": vocab_json(&files),
                "merges": merges
            }
        });
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).unwrap();
        let pad = if i == 0 { "!" } else { "<|endoftext|>" };
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            serde_json::json!({"pad_token": {"content": pad}, "added_tokens_decoder": {}}).to_string(),
        )
        .unwrap();
        let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
        let ids = tok.encode_padded("a cat").ids;
        let pad_id = if i == 0 { 0 } else { EOS };
        assert!(ids[4..].iter().all(|&id| id == pad_id));
        check_all(&tok.with_pad_id(EOS));
    }
}

#[test]
fn from_dir_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = format!("{:#}", ClipTokenizer::from_dir(dir.path()).unwrap_err());
    assert!(err.contains("vocab.json"), "{err}");

    std::fs::write(dir.path().join("vocab.json"), "{}").unwrap();
    std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\na b c\n").unwrap();
    let err = format!("{:#}", ClipTokenizer::from_dir(dir.path()).unwrap_err());
    assert!(err.contains("merges.txt"), "{err}");

    std::fs::write(dir.path().join("tokenizer.json"), "not json").unwrap();
    let err = format!("{:#}", ClipTokenizer::from_dir(dir.path()).unwrap_err());
    assert!(err.contains("tokenizer.json"), "{err}");
}

/// A prompt's chunk holds what transformers' padded encoding holds (the
/// recorded cases), also when the prompt itself contains `<|endoftext|>`:
/// that is a token like any other, and the padding starts after the end
/// token that closes the prompt.
#[test]
fn chunks_pad_as_transformers_does() {
    use sdgen::prompt::{chunk, Syntax};
    let tok = ClipTokenizer::embedded().unwrap();
    let mut with_end_token = 0;
    for case in cases() {
        let chunked = chunk(&tok, &case.prompt, Syntax::Plain);
        assert_eq!(chunked.chunks[0].ids, case.ids, "{:?}", case.prompt);
        with_end_token += usize::from(case.tokens.contains(&EOS));
    }
    assert!(with_end_token >= 5, "the recorded cases hold prompts with <|endoftext|>");
    let a_b = chunk(&tok, "a <|endoftext|> b", Syntax::A1111).chunks.remove(0);
    assert_eq!(&a_b.ids[..6], &[BOS, 320, EOS, 321, EOS, EOS]);
    assert_eq!(a_b.tokens, 3);
    let padded_with_0 = chunk(&tok.with_pad_id(0), "a <|endoftext|> b", Syntax::A1111).chunks.remove(0);
    assert_eq!(&padded_with_0.ids[..6], &[BOS, 320, EOS, 321, EOS, 0]);
}

/// Prompts may start with `-` or be `--`: they are the option's value.
#[test]
fn prompts_may_start_with_a_hyphen() {
    use sdgen::prompt::{chunk, Syntax};
    let tok = ClipTokenizer::embedded().unwrap();
    for prompt in ["-a red fox", "--", "--steps 3"] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdgen"))
            .args(["tokenize", "--json", "--prompt", prompt])
            .output()
            .unwrap();
        assert!(o.status.success(), "{prompt:?}: {}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let ids: Vec<u32> = serde_json::from_value(v["chunks"][0]["ids"].clone()).unwrap();
        assert_eq!(ids, chunk(&tok, prompt, Syntax::A1111).chunks[0].ids, "{prompt:?}");
    }
}

/// The built-in T5 v1.1 tokenizer gives Python `tokenizers`' ids on the
/// same tokenizer.json (tests/reference/t5_tokenizer_cases.py).
#[test]
fn t5_tokenizer_matches_python_tokenizers() {
    #[derive(serde::Deserialize)]
    struct Case {
        prompt: String,
        ids: Vec<u32>,
    }
    #[derive(serde::Deserialize)]
    struct Cases {
        cases: Vec<Case>,
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/t5_cases.json");
    let cases: Cases = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(cases.cases.len() >= 50);
    let t5 = sdgen::tokenizer::t5_embedded().unwrap();
    assert_eq!(t5.get_vocab_size(true), 32100);
    let wrong: Vec<&str> = cases
        .cases
        .iter()
        .filter(|c| t5.encode(c.prompt.as_str(), true).unwrap().get_ids() != c.ids.as_slice())
        .map(|c| c.prompt.as_str())
        .collect();
    assert!(wrong.is_empty(), "ids differ for {wrong:?}");
}
