//! Prompts as AUTOMATIC1111 reads them: attention weights, `BREAK`, and
//! prompts of any length in 75-token chunks.
//!
//! - `(text)` ×1.1, `[text]` ÷1.1 (nested: multiplied), `(text:1.3)` an
//!   explicit weight, `\(` `\)` `\[` `\]` `\\` literal characters.
//! - A bracket never closed, or closed without being opened, stays in the
//!   text as a character (with a warning). A1111 instead weights the rest
//!   of the prompt after an unclosed opening bracket.
//! - `BREAK` (the word, in capitals) ends the current chunk.
//! - Chunks hold 75 tokens between BOS and EOS; when one fills up and its
//!   last comma is at most 20 tokens back, the words after the comma move to
//!   the next chunk (A1111's comma backtrack).

use std::sync::OnceLock;

use regex::Regex;

use crate::tokenizer::{ClipTokenizer, MAX_LEN};

/// Tokens of a chunk between its BOS and EOS.
pub const CHUNK_TOKENS: usize = MAX_LEN - 2;
/// How far back a comma may be for the words after it to move to the next chunk.
const COMMA_BACKTRACK: usize = 20;
/// The weight that marks a `BREAK` piece (A1111's convention).
const BREAK_WEIGHT: f64 = -1.0;

/// How prompt text is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Syntax {
    /// Weights, `BREAK` and chunks, as A1111.
    #[default]
    A1111,
    /// Literal text, truncated to 75 tokens (diffusers).
    Plain,
}

impl std::str::FromStr for Syntax {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "a1111" | "auto1111" | "webui" => Ok(Syntax::A1111),
            "plain" | "diffusers" => Ok(Syntax::Plain),
            other => anyhow::bail!("--prompt-syntax {other:?}: use a1111 or plain"),
        }
    }
}

impl Syntax {
    pub fn name(self) -> &'static str {
        match self {
            Syntax::A1111 => "a1111",
            Syntax::Plain => "plain",
        }
    }
}

/// A `<lora:NAME:WEIGHT>` tag of a prompt (A1111's extra-network syntax).
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkTag {
    /// `lora` (also `lyco`), or another kind sdgen does not run.
    pub kind: String,
    pub name: String,
    pub weight: f32,
}

/// Compiled once: prompts are parsed for every job of a batch.
fn network_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"<(\w+):([^>]+)>").expect("valid pattern"))
}

/// The extra-network tags of a prompt (`<lora:fluffy:0.8>`; weight 1 when
/// left out). They are not text: [`chunk`] removes them.
pub fn network_tags(text: &str) -> anyhow::Result<Vec<NetworkTag>> {
    network_re()
        .captures_iter(text)
        .map(|c| {
            let mut fields = c[2].split(':');
            let name = fields.next().unwrap_or_default().trim().to_string();
            let weight = match fields.next() {
                Some(w) => w.trim().parse().map_err(|_| anyhow::anyhow!("{}: {w:?} is not a weight", &c[0]))?,
                None => 1.0,
            };
            Ok(NetworkTag { kind: c[1].to_ascii_lowercase(), name, weight })
        })
        .collect()
}

/// A1111's attention parser: the prompt as pieces of text with their
/// weights (equal neighbours merged; `("BREAK", -1)` for a break), and a
/// warning per unbalanced bracket.
pub fn parse_attention(text: &str) -> (Vec<(String, f64)>, Vec<String>) {
    static RES: OnceLock<(Regex, Regex)> = OnceLock::new();
    let (re, break_re) = RES.get_or_init(|| {
        let attention = r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:";
        (Regex::new(attention).expect("valid pattern"), Regex::new(r"\s*\bBREAK\b\s*").expect("valid pattern"))
    });
    // An opening bracket is a placeholder piece until it closes (then it is
    // dropped); one left open is a literal character.
    struct Piece {
        text: String,
        weight: f64,
        closed_bracket: bool,
    }
    let piece = |text: &str, weight: f64| Piece { text: text.to_string(), weight, closed_bracket: false };
    let mut res: Vec<Piece> = Vec::new();
    let (mut round, mut square) = (Vec::new(), Vec::new());
    let mut warnings = Vec::new();
    let close = |res: &mut Vec<Piece>, start: usize, by: f64| {
        res[start].closed_bracket = true;
        res[start + 1..].iter_mut().for_each(|p| p.weight *= by);
    };
    for m in re.captures_iter(text) {
        let all = m.get(0).expect("match").as_str();
        let explicit = m.get(1).and_then(|w| w.as_str().parse::<f64>().ok());
        if let Some(escaped) = all.strip_prefix('\\') {
            res.push(piece(escaped, 1.0));
        } else if all == "(" {
            round.push(res.len());
            res.push(piece("(", 1.0));
        } else if all == "[" {
            square.push(res.len());
            res.push(piece("[", 1.0));
        } else if let (Some(w), Some(start)) = (explicit, round.last().copied()) {
            round.pop();
            close(&mut res, start, w);
        } else if all == ")" && !round.is_empty() {
            let start = round.pop().expect("non-empty");
            close(&mut res, start, 1.1);
        } else if all == "]" && !square.is_empty() {
            let start = square.pop().expect("non-empty");
            close(&mut res, start, 1.0 / 1.1);
        } else {
            if all.ends_with(')') || all == "]" {
                warnings.push(format!("unbalanced {:?} in the prompt is kept as text", &all[all.len() - 1..]));
            }
            for (i, part) in break_re.split(all).enumerate() {
                if i > 0 {
                    res.push(piece("BREAK", BREAK_WEIGHT));
                }
                res.push(piece(part, 1.0));
            }
        }
    }
    for bracket in round.iter().map(|_| "(").chain(square.iter().map(|_| "[")) {
        warnings.push(format!("unbalanced {bracket:?} in the prompt is kept as text"));
    }
    let mut merged: Vec<(String, f64)> = Vec::new();
    for p in res.into_iter().filter(|p| !p.closed_bracket) {
        match merged.last_mut() {
            Some(last) if last.1 == p.weight => last.0.push_str(&p.text),
            _ => merged.push((p.text, p.weight)),
        }
    }
    if merged.is_empty() {
        merged.push((String::new(), 1.0));
    }
    (merged, warnings)
}

/// One chunk as the text encoder sees it: [`MAX_LEN`] ids (BOS, 75 tokens
/// or padding, EOS) and a weight per id.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
    /// How many of `ids` after BOS are the prompt's (the rest is EOS and
    /// padding); a prompt's own `<|endoftext|>` counts as one of them.
    pub tokens: usize,
    /// Textual-inversion embeddings: (position in `ids`, index of the
    /// embedding); its vectors replace the token embeddings from there.
    pub fixes: Vec<(usize, usize)>,
}

/// A prompt's chunks, its token count (A1111's: 75 per full chunk plus the
/// last chunk's tokens) and what the parser warned about.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunked {
    pub chunks: Vec<Chunk>,
    pub token_count: usize,
    pub warnings: Vec<String>,
}

/// Splits `text` into chunks for `tokenizer` (A1111's `tokenize_line`).
/// The words of a prompt without weights and `BREAK`s (what T5 reads in
/// A1111 syntax), or the text as given in plain syntax.
pub fn plain_text(text: &str, syntax: Syntax) -> String {
    match syntax {
        Syntax::Plain => text.to_string(),
        Syntax::A1111 => {
            let (pieces, _) = parse_attention(text);
            pieces.into_iter().filter(|(_, w)| *w != BREAK_WEIGHT).map(|(t, _)| t).collect::<Vec<_>>().join("")
        }
    }
}

pub fn chunk(tokenizer: &ClipTokenizer, text: &str, syntax: Syntax) -> Chunked {
    chunk_with(tokenizer, text, syntax, &[])
}

/// [`chunk`], where the token ids of each of `embeddings` (the tokens of its
/// name) stand for its vectors: `(name ids, vector count)`.
pub fn chunk_with(tokenizer: &ClipTokenizer, text: &str, syntax: Syntax, embeddings: &[(Vec<u32>, usize)]) -> Chunked {
    let specials = tokenizer.specials();
    if syntax == Syntax::Plain {
        let mut tokens = tokenizer.encode(text);
        let token_count = tokens.len();
        let mut warnings = Vec::new();
        if tokens.len() > CHUNK_TOKENS {
            let dropped = tokenizer.encode_padded(text).dropped.unwrap_or_default();
            warnings.push(format!("prompt is longer than 75 tokens; this part was dropped: {dropped:?}"));
            tokens.truncate(CHUNK_TOKENS);
        }
        let n = tokens.len();
        return Chunked { chunks: vec![finish(specials, tokens, vec![1.0; n], Vec::new())], token_count, warnings };
    }
    let text = network_re().replace_all(text, "");
    let (pieces, warnings) = parse_attention(&text);
    let comma = tokenizer.token_id(",</w>");
    let mut b = Builder { specials, ..Builder::default() };
    for (text, weight) in &pieces {
        if *weight == BREAK_WEIGHT && text == "BREAK" {
            b.next_chunk(false);
            continue;
        }
        let tokens = tokenizer.encode(text);
        let mut pos = 0;
        while pos < tokens.len() {
            let token = tokens[pos];
            if Some(token) == comma {
                b.last_comma = Some(b.body.len());
            } else if let Some(c) =
                b.last_comma.filter(|&c| b.body.len() == CHUNK_TOKENS && b.body.len() - c <= COMMA_BACKTRACK)
            {
                // Move the words after the last comma to the next chunk.
                let moved = (b.body.split_off(c + 1), b.weights.split_off(c + 1));
                let (stay, go): (Vec<_>, Vec<_>) = b.fixes.drain(..).partition(|(p, _)| *p <= c);
                b.fixes = stay;
                b.next_chunk(false);
                (b.body, b.weights) = moved;
                b.fixes = go.into_iter().map(|(p, e)| (p - c - 1, e)).collect();
            }
            if b.body.len() == CHUNK_TOKENS {
                b.next_chunk(false);
            }
            // The longest embedding name starting here.
            let found = embeddings
                .iter()
                .enumerate()
                .filter(|(_, (ids, _))| !ids.is_empty() && tokens[pos..].starts_with(ids))
                .max_by_key(|(_, (ids, _))| ids.len());
            match found {
                None => {
                    b.body.push(token);
                    b.weights.push(*weight as f32);
                    pos += 1;
                }
                Some((index, (ids, vectors))) => {
                    if b.body.len() + vectors > CHUNK_TOKENS {
                        b.next_chunk(false);
                    }
                    b.fixes.push((b.body.len(), index));
                    // Placeholders (id 0, as A1111) the vectors replace.
                    b.body.extend(std::iter::repeat_n(0, *vectors));
                    b.weights.extend(std::iter::repeat_n(*weight as f32, *vectors));
                    pos += ids.len();
                }
            }
        }
    }
    if !b.body.is_empty() || b.chunks.is_empty() {
        b.next_chunk(true);
    }
    Chunked { chunks: b.chunks, token_count: b.token_count, warnings }
}

/// A chunk's ids: BOS, `body` (≤ 75), the end token, then padding up to
/// 77 (SD 2.x and SDXL's second encoder pad with `!`, others with the end
/// token itself), as transformers pads: an end token inside `body` (the
/// prompt's own `<|endoftext|>`) stays a token. `fixes` are positions in `body`.
fn finish((bos, eos, pad): (u32, u32, u32), body: Vec<u32>, weights: Vec<f32>, fixes: Vec<(usize, usize)>) -> Chunk {
    let tokens = body.len();
    let mut ids = Vec::with_capacity(MAX_LEN);
    ids.push(bos);
    ids.extend(&body);
    ids.push(eos);
    ids.resize(MAX_LEN, pad);
    let mut w = Vec::with_capacity(MAX_LEN);
    w.push(1.0);
    w.extend(&weights);
    w.resize(MAX_LEN, 1.0);
    Chunk { ids, weights: w, tokens, fixes: fixes.into_iter().map(|(p, e)| (p + 1, e)).collect() }
}

/// The chunks so far and the one being filled.
#[derive(Default)]
struct Builder {
    /// BOS, EOS and padding ids.
    specials: (u32, u32, u32),
    chunks: Vec<Chunk>,
    body: Vec<u32>,
    weights: Vec<f32>,
    fixes: Vec<(usize, usize)>,
    token_count: usize,
    /// Where in `body` the last comma is.
    last_comma: Option<usize>,
}

impl Builder {
    fn next_chunk(&mut self, last: bool) {
        self.token_count += if last { self.body.len() } else { CHUNK_TOKENS };
        let (body, weights, fixes) =
            (std::mem::take(&mut self.body), std::mem::take(&mut self.weights), std::mem::take(&mut self.fixes));
        self.chunks.push(finish(self.specials, body, weights, fixes));
        self.last_comma = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Vec<(String, f64)> {
        parse_attention(text).0
    }

    fn p(text: &str, w: f64) -> (String, f64) {
        (text.to_string(), w)
    }

    #[test]
    fn weights_nest_and_escape() {
        assert_eq!(parsed("a (b) c"), [p("a ", 1.0), p("b", 1.1), p(" c", 1.0)]);
        assert_eq!(parsed("((b))"), [p("b", 1.1 * 1.1)]);
        assert_eq!(parsed("[b]"), [p("b", 1.0 / 1.1)]);
        assert_eq!(parsed("(b:1.3) ( c : 0.5 )"), [p("b", 1.3), p(" ", 1.0), p(" c ", 0.5)]);
        assert_eq!(parsed("((a:1.5) b)"), [p("a", 1.5 * 1.1), p(" b", 1.1)]);
        assert_eq!(parsed(r"\(a\) \[b\] c\\d"), [p(r"(a) [b] c\d", 1.0)]);
        assert_eq!(parsed("a: b"), [p("a: b", 1.0)]);
        assert_eq!(parsed(""), [p("", 1.0)]);
    }

    #[test]
    fn unbalanced_brackets_are_text_with_a_warning() {
        let (pieces, warnings) = parse_attention("(a b");
        assert_eq!(pieces, [p("(a b", 1.0)]);
        assert_eq!(warnings.len(), 1);
        let (pieces, warnings) = parse_attention("a) [b");
        assert_eq!(pieces, [p("a) [b", 1.0)]);
        assert_eq!(warnings.len(), 2);
        assert_eq!(parsed("((a) b"), [p("(", 1.0), p("a", 1.1), p(" b", 1.0)]);
        // Closed brackets leave no trace between equally weighted pieces.
        assert_eq!(parsed("((a)(b))"), [p("ab", 1.1 * 1.1)]);
    }

    #[test]
    fn network_tags_are_read_and_removed() {
        let tags = network_tags("a <lora:fluffy:0.8> fox <LoRA:x> <hypernet:h:1>").unwrap();
        let tag = |kind: &str, name: &str, weight| NetworkTag { kind: kind.into(), name: name.into(), weight };
        assert_eq!(tags, [tag("lora", "fluffy", 0.8), tag("lora", "x", 1.0), tag("hypernet", "h", 1.0)]);
        assert!(network_tags("<lora:x:abc>").is_err());
        let tokenizer = ClipTokenizer::embedded().unwrap();
        assert_eq!(
            chunk(&tokenizer, "a <lora:fluffy:0.8> fox", Syntax::A1111),
            chunk(&tokenizer, "a fox", Syntax::A1111)
        );
    }

    #[test]
    fn break_splits_but_not_inside_words() {
        assert_eq!(parsed("a BREAK b"), [p("a", 1.0), p("BREAK", -1.0), p("b", 1.0)]);
        assert_eq!(parsed("BREAKFAST"), [p("BREAKFAST", 1.0)]);
        assert_eq!(parsed("café 猫 🦊 (é:1.2)"), [p("café 猫 🦊 ", 1.0), p("é", 1.2)]);
    }
}
