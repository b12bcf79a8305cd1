//! CLIP byte-level BPE tokenizer, matching `transformers` 5.x `CLIPTokenizer`.
//!
//! The pipeline reproduces the `tokenizers`-backed tokenizer that transformers 5.x builds for
//! CLIP (which differs from the old 4.x "slow" tokenizer on CJK, emoji and control characters):
//!
//! 1. The special tokens `<|startoftext|>` and `<|endoftext|>` are cut out of the raw text
//!    (exact, case-sensitive matches) and map straight to their ids.
//! 2. Every other segment is normalized: Unicode NFC (with the Unicode 9.0 data `tokenizers`
//!    uses), each run of whitespace replaced by one space, then lowercased character by
//!    character (no final-sigma rule).
//! 3. Pre-tokenization: the CLIP regex splits the text into words (whitespace is dropped); each
//!    word is split again by the GPT-2 byte-level pattern (which only matters for the
//!    `<|...|>` alternatives of the CLIP regex), then its UTF-8 bytes are mapped to printable
//!    characters (`bytes_to_unicode`).
//! 4. BPE with the `</w>` end-of-word suffix: repeatedly merge the adjacent pair of lowest rank
//!    (leftmost first on ties).
//! 5. `encode_padded` adds BOS/EOS, truncates to 77 ids and pads with the pad token.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use regex::Regex;
use serde::Deserialize;
use unicode_normalization::char::{canonical_combining_class, compose, decompose_canonical};

/// The CLIP vocabulary file of OpenAI / open_clip (MIT licensed), see `assets/README.md`.
const EMBEDDED_BPE: &[u8] = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/bpe_simple_vocab_16e6.txt.gz"));

/// T5 v1.1's tokenizer (assets/README.md): for SD 3.5 single files.
const EMBEDDED_T5: &[u8] = include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/t5_tokenizer.json.gz"));

/// T5 v1.1's tokenizer, built into the binary (SentencePiece unigram,
/// 32,100 pieces), as the `tokenizers` library reads its `tokenizer.json`.
pub fn t5_embedded() -> anyhow::Result<tokenizers::Tokenizer> {
    let mut json = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(EMBEDDED_T5), &mut json)
        .context("decompressing the embedded T5 tokenizer")?;
    tokenizers::Tokenizer::from_bytes(&json).map_err(|e| anyhow::anyhow!("the embedded T5 tokenizer: {e}"))
}

/// Context length of the CLIP text encoder: BOS + 75 tokens + EOS.
pub const MAX_LEN: usize = 77;

const BOS_TOKEN: &str = "<|startoftext|>";
const EOS_TOKEN: &str = "<|endoftext|>";
const END_OF_WORD: &str = "</w>";
/// Number of merges CLIP uses from the vocabulary file.
const NUM_MERGES: usize = 49152 - 256 - 2;

/// The CLIP pre-tokenizer pattern (`transformers` 5.x `CLIPTokenizer`).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// The GPT-2 byte-level pattern applied to every CLIP word; words hold no whitespace, so the
/// optional leading space and the whitespace alternatives of the original pattern never apply.
const BYTE_LEVEL_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+";

/// A prompt encoded for the CLIP text encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Exactly [`MAX_LEN`] ids: BOS, at most 75 tokens, EOS, then padding.
    pub ids: Vec<u32>,
    /// The text of the tokens cut off by truncation, if any (decoded like diffusers does).
    pub dropped: Option<String>,
}

/// CLIP byte-level BPE tokenizer.
#[derive(Clone)]
pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    tokens: HashMap<u32, String>,
    /// (left id, right id) -> (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    byte_chars: [char; 256],
    char_bytes: HashMap<char, u8>,
    clip_re: Regex,
    byte_level_re: Regex,
    whitespace_re: Regex,
    bos: u32,
    eos: u32,
    pad: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.vocab.len())
            .field("merges", &self.merges.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .finish_non_exhaustive()
    }
}

/// GPT-2 / CLIP reversible mapping of bytes to printable Unicode characters.
fn bytes_to_unicode() -> [char; 256] {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut chars = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        let code = if printable(b) {
            b
        } else {
            next += 1;
            next - 1
        };
        chars[b as usize] = char::from_u32(code).expect("byte code points are valid chars");
    }
    chars
}

#[derive(Deserialize)]
struct TokenizerJson {
    model: TokenizerJsonModel,
    #[serde(default)]
    added_tokens: Vec<AddedToken>,
}

#[derive(Deserialize)]
struct TokenizerJsonModel {
    vocab: HashMap<String, u32>,
    merges: Vec<MergeEntry>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum MergeEntry {
    Joined(String),
    Pair([String; 2]),
}

#[derive(Deserialize)]
struct AddedToken {
    id: u32,
    content: String,
}

/// A special token in `tokenizer_config.json` / `special_tokens_map.json`.
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenSpec {
    Plain(String),
    Object { content: String },
}

#[derive(Deserialize)]
struct SpecialTokens {
    pad_token: Option<TokenSpec>,
    added_tokens_decoder: Option<serde_json::Value>,
}

// `tokenizers` normalizes with the Unicode 9.0 tables of its `unicode-normalization-alignments`
// crate, `unicode-normalization` has current ones. The two lists below make up the difference;
// they were found by comparing every code point (alone, doubled, decomposed and next to other
// combining marks) with tokenizers 0.23.3.

/// Composite characters encoded after Unicode 9.0: their decompositions are not composed, and
/// they are not decomposed.
#[rustfmt::skip]
const POST_UNICODE_9_COMPOSITES: &[char] = &[
    '\u{105C9}', '\u{105E4}', '\u{11383}', '\u{11385}', '\u{1138E}', '\u{11391}', '\u{113C5}',
    '\u{113C7}', '\u{113C8}', '\u{11938}', '\u{16121}', '\u{16122}', '\u{16123}', '\u{16124}',
    '\u{16125}', '\u{16126}', '\u{16127}', '\u{16128}', '\u{16D68}', '\u{16D69}', '\u{16D6A}',
];

/// Ranges of combining marks (canonical combining class > 0) encoded after Unicode 9.0; they
/// count as class 0, i.e. they are not reordered.
#[rustfmt::skip]
const POST_UNICODE_9_MARKS: &[(u32, u32)] = &[
    (0x5C8, 0x5C9), (0x7FD, 0x7FD), (0x897, 0x89F), (0x8CA, 0x8D3), (0x9FE, 0x9FE), (0xC3C, 0xC3C),
    (0xD3B, 0xD3C), (0xEBA, 0xEBA), (0x1715, 0x1715), (0x1ABF, 0x1AF0), (0x1DF6, 0x1DFA),
    (0xA82C, 0xA82C), (0x10D24, 0x10D27), (0x10D69, 0x10D6D), (0x10EAB, 0x10EAC),
    (0x10ECB, 0x10ECF), (0x10EF0, 0x10EFB), (0x10EFD, 0x10EFF), (0x10F46, 0x10F50),
    (0x10F82, 0x10F85), (0x11070, 0x11070), (0x1133B, 0x1133B), (0x113CE, 0x113D0),
    (0x1145E, 0x1145E), (0x11839, 0x1183A), (0x1193D, 0x1193E), (0x11943, 0x11943),
    (0x119E0, 0x119E0), (0x11A34, 0x11A34), (0x11A47, 0x11A47), (0x11A99, 0x11A99),
    (0x11D42, 0x11D42), (0x11D44, 0x11D45), (0x11D97, 0x11D97), (0x11F41, 0x11F42),
    (0x1612F, 0x1612F), (0x16FF0, 0x16FF1), (0x1D127, 0x1D128), (0x1D250, 0x1D252),
    (0x1D25B, 0x1D25C), (0x1D25F, 0x1D25F), (0x1D280, 0x1D281), (0x1E08F, 0x1E08F),
    (0x1E130, 0x1E136), (0x1E2AE, 0x1E2AE), (0x1E2EC, 0x1E2EF), (0x1E4EC, 0x1E4EF),
    (0x1E5EE, 0x1E5EF), (0x1E6E3, 0x1E6E3), (0x1E6E6, 0x1E6E6), (0x1E6EE, 0x1E6EF),
    (0x1E6F5, 0x1E6F5),
];

/// Canonical combining class as of Unicode 9.0.
fn combining_class(c: char) -> u8 {
    let code = c as u32;
    if POST_UNICODE_9_MARKS.iter().any(|&(lo, hi)| (lo..=hi).contains(&code)) {
        0
    } else {
        canonical_combining_class(c)
    }
}

/// Unicode NFC as `tokenizers` computes it, with Unicode 9.0 data: characters and compositions
/// added later are left alone. This differs from current NFC only on a few scripts encoded
/// since 2017.
fn nfc(text: &str) -> String {
    // Canonical decomposition, then canonical ordering of each run of combining marks.
    let mut chars: Vec<(char, u8)> = Vec::with_capacity(text.len());
    for c in text.chars() {
        if POST_UNICODE_9_COMPOSITES.contains(&c) {
            chars.push((c, 0));
        } else {
            decompose_canonical(c, |d| chars.push((d, combining_class(d))));
        }
    }
    let mut start = 0;
    while start < chars.len() {
        let end = chars[start..].iter().position(|&(_, class)| class == 0).map_or(chars.len(), |n| start + n);
        chars[start..end].sort_by_key(|&(_, class)| class);
        start = end + 1;
    }
    // Canonical composition: a character combines with the last starter unless a character
    // in between has class 0 or a class not lower than its own.
    let mut out: Vec<char> = Vec::with_capacity(chars.len());
    let mut starter: Option<usize> = None;
    let mut last_class: Option<u8> = None;
    for (c, class) in chars {
        if let Some(s) = starter {
            let blocked = last_class.is_some_and(|last| last == 0 || last >= class);
            if !blocked {
                if let Some(composed) =
                    compose(out[s], c).filter(|composed| !POST_UNICODE_9_COMPOSITES.contains(composed))
                {
                    out[s] = composed;
                    continue;
                }
            }
        }
        if class == 0 {
            starter = Some(out.len());
            last_class = None;
        } else {
            last_class = Some(class);
        }
        out.push(c);
    }
    out.into_iter().collect()
}

fn split_merge_line(line: &str) -> Result<(String, String)> {
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => Ok((a.to_string(), b.to_string())),
        _ => bail!("invalid merge {line:?}"),
    }
}

/// The pad token named by a diffusers `tokenizer/` folder, following transformers: the
/// legacy `special_tokens_map.json` overrides `tokenizer_config.json` unless the latter
/// carries an `added_tokens_decoder`.
fn pad_token_of_dir(dir: &Path) -> Result<Option<String>> {
    let read = |name: &str| -> Result<Option<SpecialTokens>> {
        let path = dir.join(name);
        if path.is_file() {
            crate::files::read_json(&path).map(Some)
        } else {
            Ok(None)
        }
    };
    let config = read("tokenizer_config.json")?;
    let map = read("special_tokens_map.json")?;
    let content = |spec: TokenSpec| match spec {
        TokenSpec::Plain(s) | TokenSpec::Object { content: s } => s,
    };
    let (config_pad, config_is_new) = match config {
        Some(c) => (c.pad_token.map(content), c.added_tokens_decoder.is_some()),
        None => (None, false),
    };
    let map_pad = map.and_then(|m| m.pad_token).map(content);
    Ok(if config_is_new { config_pad } else { map_pad.or(config_pad) })
}

impl ClipTokenizer {
    /// The CLIP tokenizer from the vocabulary embedded in the binary, padding with
    /// `<|endoftext|>` (49407) like Stable Diffusion 1.x.
    pub fn embedded() -> Result<Self> {
        Self::embedded_for(NUM_MERGES + 514)
    }

    /// The embedded tokenizer for a text encoder with `vocab_size` token
    /// embeddings. CLIP orders its vocabulary as 512 byte tokens, the merges
    /// by rank, then BOS and EOS, so its first `n` merges with the two
    /// specials after them are a complete smaller BPE vocabulary: single
    /// files with a smaller token table (tiny test models) use that.
    pub fn embedded_for(vocab_size: usize) -> Result<Self> {
        let Some(merges) = vocab_size.checked_sub(514).filter(|&m| m <= NUM_MERGES) else {
            bail!(
                "a text encoder with {vocab_size} token embeddings does not fit CLIP's vocabulary (at most {})",
                NUM_MERGES + 514
            );
        };
        Self::from_bpe_gz(EMBEDDED_BPE, merges).context("loading embedded bpe_simple_vocab_16e6.txt.gz")
    }

    fn from_bpe_gz(gz: &[u8], count: usize) -> Result<Self> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(gz).read_to_string(&mut text).context("decompressing")?;
        // The first line is a header; CLIP uses the next NUM_MERGES lines.
        let merges = text.split('\n').skip(1).take(count).map(split_merge_line).collect::<Result<Vec<_>>>()?;
        if merges.len() != count {
            bail!("expected {count} merges, found {}", merges.len());
        }
        // The first 256 ids are the byte characters in CLIP's order: the printable bytes (which
        // stand for themselves) first, then the others (U+0100 onwards), i.e. by code point.
        let mut byte_chars = bytes_to_unicode();
        byte_chars.sort_unstable();
        let mut tokens: Vec<String> = byte_chars.iter().map(|c| c.to_string()).collect();
        tokens.extend(byte_chars.iter().map(|c| format!("{c}{END_OF_WORD}")));
        tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        tokens.push(BOS_TOKEN.to_string());
        tokens.push(EOS_TOKEN.to_string());
        let vocab = tokens.into_iter().enumerate().map(|(i, t)| (t, i as u32)).collect();
        Self::build(vocab, merges, &[], EOS_TOKEN)
    }

    /// The tokenizer of a diffusers `tokenizer/` folder: `tokenizer.json`, or `vocab.json` with
    /// `merges.txt`; the pad token comes from `tokenizer_config.json` /
    /// `special_tokens_map.json` (default `<|endoftext|>`).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tokenizer_json = dir.join("tokenizer.json");
        let (vocab, merges, added) = if tokenizer_json.is_file() {
            let parsed: TokenizerJson = crate::files::read_json(&tokenizer_json)?;
            let merges = parsed
                .model
                .merges
                .into_iter()
                .map(|m| match m {
                    MergeEntry::Joined(s) => split_merge_line(&s),
                    MergeEntry::Pair([a, b]) => Ok((a, b)),
                })
                .collect::<Result<Vec<_>>>()
                .with_context(|| format!("parsing merges of {}", tokenizer_json.display()))?;
            let added = parsed.added_tokens.into_iter().map(|t| (t.content, t.id)).collect();
            (parsed.model.vocab, merges, added)
        } else {
            let vocab_path = dir.join("vocab.json");
            let vocab: HashMap<String, u32> = crate::files::read_json(&vocab_path)?;
            let merges_path = dir.join("merges.txt");
            let text =
                std::fs::read_to_string(&merges_path).with_context(|| format!("reading {}", merges_path.display()))?;
            let merges = text
                .lines()
                .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
                .map(split_merge_line)
                .collect::<Result<Vec<_>>>()
                .with_context(|| format!("parsing {}", merges_path.display()))?;
            (vocab, merges, Vec::new())
        };
        let pad = pad_token_of_dir(dir)?.unwrap_or_else(|| EOS_TOKEN.to_string());
        Self::build(vocab, merges, &added, &pad).with_context(|| format!("loading tokenizer from {}", dir.display()))
    }

    fn build(
        mut vocab: HashMap<String, u32>,
        merges: Vec<(String, String)>,
        added: &[(String, u32)],
        pad_token: &str,
    ) -> Result<Self> {
        for (content, id) in added {
            vocab.entry(content.clone()).or_insert(*id);
        }
        let id_of = |t: &str| vocab.get(t).copied().ok_or_else(|| anyhow!("token {t:?} is not in the vocabulary"));
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, (a, b)) in merges.iter().enumerate() {
            let merged = id_of(&format!("{a}{b}"))?;
            merge_map.insert((id_of(a)?, id_of(b)?), (rank as u32, merged));
        }
        let (bos, eos, pad) = (id_of(BOS_TOKEN)?, id_of(EOS_TOKEN)?, id_of(pad_token)?);
        let byte_chars = bytes_to_unicode();
        let char_bytes = (0..=255u8).map(|b| (byte_chars[b as usize], b)).collect();
        let tokens = vocab.iter().map(|(t, &i)| (i, t.clone())).collect();
        Ok(Self {
            vocab,
            tokens,
            merges: merge_map,
            byte_chars,
            char_bytes,
            clip_re: Regex::new(CLIP_PATTERN)?,
            byte_level_re: Regex::new(BYTE_LEVEL_PATTERN)?,
            whitespace_re: Regex::new(r"\s+")?,
            bos,
            eos,
            pad,
        })
    }

    /// Use `pad` as the padding id (Stable Diffusion 2.x and later pad with 0, `!`).
    pub fn with_pad_id(mut self, pad: u32) -> Self {
        self.pad = pad;
        self
    }

    /// BPE ids of `text`, without the added BOS/EOS and without truncation. The literal text
    /// `<|startoftext|>` / `<|endoftext|>` maps to its id, as in transformers.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut rest = text;
        loop {
            // Special tokens are matched on the raw text, before normalization.
            let next = [(BOS_TOKEN, self.bos), (EOS_TOKEN, self.eos)]
                .into_iter()
                .filter_map(|(t, id)| rest.find(t).map(|pos| (pos, t.len(), id)))
                .min();
            match next {
                Some((pos, len, id)) => {
                    self.encode_segment(&rest[..pos], &mut ids);
                    ids.push(id);
                    rest = &rest[pos + len..];
                }
                None => {
                    self.encode_segment(rest, &mut ids);
                    return ids;
                }
            }
        }
    }

    fn encode_segment(&self, text: &str, ids: &mut Vec<u32>) {
        let nfc = nfc(text);
        let spaced = self.whitespace_re.replace_all(&nfc, " ");
        let lower: String = spaced.chars().flat_map(char::to_lowercase).collect();
        for piece in self.clip_re.find_iter(&lower) {
            for word in self.byte_level_re.find_iter(piece.as_str()) {
                let mapped: Vec<char> = word.as_str().bytes().map(|b| self.byte_chars[b as usize]).collect();
                self.bpe(&mapped, ids);
            }
        }
    }

    /// BPE of one word given as byte-level characters; merges the lowest-ranked adjacent pair
    /// (leftmost on ties) until none applies.
    fn bpe(&self, word: &[char], ids: &mut Vec<u32>) {
        let last = word.len().saturating_sub(1);
        let mut symbols: Vec<u32> = word
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let token = if i == last { format!("{c}{END_OF_WORD}") } else { c.to_string() };
                // Unknown symbols become the unknown token, `<|endoftext|>`.
                self.vocab.get(&token).copied().unwrap_or(self.eos)
            })
            .collect();
        loop {
            let best = symbols
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| self.merges.get(&(w[0], w[1])).map(|&(r, m)| (r, i, m)))
                .min();
            let Some((_, i, merged)) = best else { break };
            symbols[i] = merged;
            symbols.remove(i + 1);
        }
        ids.extend(symbols);
    }

    /// Text of `ids` as transformers decodes it: byte-level decoding, `</w>` read as a space.
    fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for token in ids.iter().filter_map(|id| self.tokens.get(id)) {
            let decoded: Option<Vec<u8>> = token.chars().map(|c| self.char_bytes.get(&c).copied()).collect();
            // A token that is not byte-level text (an added token) is taken as it is.
            bytes.extend(decoded.unwrap_or_else(|| token.as_bytes().to_vec()));
        }
        // Python's `str.strip()`: Unicode whitespace and the separators U+001C..U+001F.
        String::from_utf8_lossy(&bytes)
            .replace(END_OF_WORD, " ")
            .trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
            .to_string()
    }

    /// The ids of the begin, end and padding tokens.
    pub fn specials(&self) -> (u32, u32, u32) {
        (self.bos, self.eos, self.pad)
    }

    /// The id of a vocabulary entry (`",</w>"`), if any.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied()
    }

    /// The vocabulary entry of an id, as stored (`"fox</w>"`).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(&id).map(String::as_str)
    }

    /// [`MAX_LEN`] ids for the text encoder: BOS, the first 75 BPE ids of `text`, EOS, then
    /// padding. Tokens past the limit are dropped and reported in [`Encoded::dropped`].
    pub fn encode_padded(&self, text: &str) -> Encoded {
        let mut tokens = self.encode(text);
        let dropped = if tokens.len() > MAX_LEN - 2 {
            let text = self.decode(&tokens[MAX_LEN - 2..]);
            tokens.truncate(MAX_LEN - 2);
            Some(text)
        } else {
            None
        };
        let mut ids = Vec::with_capacity(MAX_LEN);
        ids.push(self.bos);
        ids.extend(tokens);
        ids.push(self.eos);
        ids.resize(MAX_LEN, self.pad);
        Encoded { ids, dropped }
    }
}
