//! Mutations shared by the targets: bytes, lines, tokens and JSON structure. Each applies one
//! random edit and logs it, so a failure report says exactly what was done to the input.

use super::Fz;
use serde_json::{json, Value};

/// Number spellings at type edges, NaN / infinity in every common spelling, and near-numbers.
pub const NUMBERS: &[&str] = &[
    "0",
    "-0",
    "1",
    "-1",
    "2",
    "255",
    "65536",
    "2147483648",
    "4294967295",
    "4294967296",
    "9007199254740993",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "-9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "340282366920938463463374607431768211456",
    "1e308",
    "1e309",
    "-1e309",
    "1e-400",
    "5e-324",
    "0.0",
    "-0.0",
    "1.5",
    "3e-4",
    "nan",
    "+nan",
    "-nan",
    "inf",
    "+inf",
    "-inf",
    "NaN",
    "Infinity",
    "-Infinity",
    "1_000",
    "0x10",
    "0o17",
    "0b11",
    "+7",
    "01",
    "1.",
    ".5",
    "1e",
    "--1",
];

/// Structural characters and odd text for insertions.
pub const TOKENS: &[&str] = &[
    "\"",
    "'",
    "\"\"\"",
    "'''",
    "[",
    "]",
    "[[",
    "]]",
    "{",
    "}",
    "=",
    ",",
    ".",
    ":",
    "#",
    "\\",
    "\\u0000",
    "\\uD800",
    "\n",
    "\r\n",
    "\r",
    "\t",
    " ",
    "\0",
    "\u{feff}",
    "\u{7f}",
    "é",
    "\u{10ffff}",
    "true",
    "false",
    "null",
    "[]",
    "{}",
    "[1, 2]",
    "\"x\"",
    "a.b",
    "-",
    "--",
];

const SPECIAL_BYTES: &[u8] = &[
    0x00, 0xff, 0x7f, 0x80, 0xc0, 0xfe, b'"', b'\\', b'{', b'}', b'[', b']', b',', b':', b'=',
    b'\n', b'\r', b' ', b'#', b'0', b'9', b'-', b'e', b'.',
];

/// A position in `0..=len`, biased towards `focus` (e.g. a header) half of the time.
fn position(fz: &mut Fz, len: usize, focus: Option<(usize, usize)>) -> usize {
    match focus {
        Some((a, b)) if b > a && fz.chance(0.5) => fz.range(a, b.min(len)),
        _ => fz.below(len + 1),
    }
}

/// One byte-level edit (in `focus`, a byte range, half of the time).
pub fn bytes(fz: &mut Fz, data: &mut Vec<u8>, focus: Option<(usize, usize)>) {
    let len = data.len();
    let at = position(fz, len, focus);
    let at_byte = at.min(len.saturating_sub(1));
    match fz.below(9) {
        0 if len > 0 => {
            let bit = fz.below(8);
            data[at_byte] ^= 1 << bit;
            fz.note(format!("flip bit {bit} of byte {at_byte}"));
        }
        1 if len > 0 => {
            let b = *fz.pick(SPECIAL_BYTES);
            data[at_byte] = b;
            fz.note(format!("set byte {at_byte} to {b:#04x}"));
        }
        2 if len > 0 => {
            let b = fz.below(256) as u8;
            data[at_byte] = b;
            fz.note(format!("set byte {at_byte} to {b:#04x}"));
        }
        3 => {
            data.truncate(at);
            fz.note(format!("truncate to {at} bytes"));
        }
        4 => {
            let n = fz.range(1, 16);
            let ins: Vec<u8> = (0..n).map(|_| fz.below(256) as u8).collect();
            fz.note(format!("insert {ins:02x?} at {at}"));
            data.splice(at..at, ins);
        }
        5 => {
            let t = if fz.chance(0.5) {
                *fz.pick(TOKENS)
            } else {
                *fz.pick(NUMBERS)
            };
            fz.note(format!("insert {t:?} at {at}"));
            data.splice(at..at, t.bytes());
        }
        6 if len > 0 => {
            let n = fz.range(1, 32).min(len - at_byte);
            data.drain(at_byte..at_byte + n);
            fz.note(format!("delete {n} bytes at {at_byte}"));
        }
        7 if len > 0 => {
            let n = fz.range(1, 64).min(len - at_byte);
            let copy = data[at_byte..at_byte + n].to_vec();
            let to = fz.below(data.len() + 1);
            data.splice(to..to, copy);
            fz.note(format!("copy {n} bytes from {at_byte} to {to}"));
        }
        _ => {
            let t = *fz.pick(NUMBERS);
            let n = t.len().min(len - at.min(len));
            data.splice(at..at + n, t.bytes());
            fz.note(format!("overwrite {n} bytes at {at} with {t:?}"));
        }
    }
}

/// Line-level edits: duplicate, delete, swap or move lines.
pub fn lines(fz: &mut Fz, text: &str) -> String {
    let mut ls: Vec<&str> = text.split_inclusive('\n').collect();
    if ls.is_empty() {
        return text.to_string();
    }
    let i = fz.below(ls.len());
    let j = fz.below(ls.len());
    match fz.below(4) {
        0 => {
            ls.insert(j, ls[i]);
            fz.note(format!("duplicate line {i} before line {j}"));
        }
        1 => {
            ls.remove(i);
            fz.note(format!("delete line {i}"));
        }
        2 => {
            ls.swap(i, j);
            fz.note(format!("swap lines {i} and {j}"));
        }
        _ => {
            let l = ls.remove(i);
            ls.insert(j.min(ls.len()), l);
            fz.note(format!("move line {i} to {j}"));
        }
    }
    let mut out: String = ls.concat();
    if !out.ends_with('\n') && fz.chance(0.5) {
        out.push('\n');
    }
    out
}

/// Word-like tokens: runs of alphanumerics and `_ . + -`.
fn word_spans(text: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        let w = c.is_alphanumeric() || matches!(c, '_' | '.' | '+' | '-');
        match (w, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                spans.push((s, i));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        spans.push((s, text.len()));
    }
    spans
}

/// Token-level edits: swap two words, or replace one by an odd number or literal.
pub fn tokens(fz: &mut Fz, text: &str) -> String {
    let spans = word_spans(text);
    if spans.len() < 2 {
        return text.to_string();
    }
    let (a, b) = (fz.below(spans.len()), fz.below(spans.len()));
    if fz.chance(0.4) {
        let (x, y) = (spans[a.min(b)], spans[a.max(b)]);
        if x == y {
            return text.to_string();
        }
        fz.note(format!(
            "swap tokens {:?} and {:?}",
            &text[x.0..x.1],
            &text[y.0..y.1]
        ));
        return [
            &text[..x.0],
            &text[y.0..y.1],
            &text[x.1..y.0],
            &text[x.0..x.1],
            &text[y.1..],
        ]
        .concat();
    }
    let s = spans[a];
    let with = if fz.chance(0.7) {
        *fz.pick(NUMBERS)
    } else {
        *fz.pick(TOKENS)
    };
    fz.note(format!("replace token {:?} with {with:?}", &text[s.0..s.1]));
    [&text[..s.0], with, &text[s.1..]].concat()
}

/// One random edit of any level to a text input.
pub fn text(fz: &mut Fz, text: &str) -> Vec<u8> {
    match fz.below(3) {
        0 => lines(fz, text).into_bytes(),
        1 => tokens(fz, text).into_bytes(),
        _ => {
            let mut b = text.as_bytes().to_vec();
            bytes(fz, &mut b, None);
            b
        }
    }
}

/// Values of the wrong type or at the edge of their type, for JSON edits.
fn odd_value(fz: &mut Fz) -> Value {
    let big = 1u64 << fz.range(31, 63);
    match fz.below(16) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(""),
        3 => json!("x"),
        4 => json!(-1),
        5 => json!(1.5),
        6 => json!(u64::MAX),
        7 => json!(i64::MIN),
        8 => json!(1e308),
        9 => json!([]),
        10 => json!({}),
        11 => json!([big, big, 16]),
        12 => json!(*fz.pick(&["F64", "F8_E4M3", "I64", "Q4", "bf16", "BOOL", "U8", "f32"])),
        13 => json!(big),
        14 => json!([0, u64::MAX]),
        _ => json!(*fz.pick(&["../manifest.json", "rank-1.safetensors", "a\u{0}b", "é"])),
    }
}

#[derive(Clone, Debug)]
enum Seg {
    Key(String),
    Idx(usize),
}

fn paths(v: &Value, here: &mut Vec<Seg>, out: &mut Vec<Vec<Seg>>) {
    out.push(here.clone());
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                here.push(Seg::Key(k.clone()));
                paths(x, here, out);
                here.pop();
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                here.push(Seg::Idx(i));
                paths(x, here, out);
                here.pop();
            }
        }
        _ => {}
    }
}

fn at<'a>(v: &'a mut Value, path: &[Seg]) -> &'a mut Value {
    path.iter().fold(v, |v, s| match s {
        Seg::Key(k) => &mut v[k.as_str()],
        Seg::Idx(i) => &mut v[*i],
    })
}

fn show(path: &[Seg]) -> String {
    let mut s = String::from("$");
    for p in path {
        match p {
            Seg::Key(k) => s += &format!(".{k}"),
            Seg::Idx(i) => s += &format!("[{i}]"),
        }
    }
    s
}

/// One structural edit at a random node: wrong type, deleted, duplicated, numbers pushed to
/// their limits, arrays emptied or grown, unknown keys added.
pub fn json(fz: &mut Fz, v: &mut Value) {
    let mut all = Vec::new();
    paths(v, &mut Vec::new(), &mut all);
    let path = fz.pick(&all).clone();
    let where_ = show(&path);
    let kind = fz.below(7);
    if kind == 1 && !path.is_empty() {
        let (last, parent) = path.split_last().expect("non-empty");
        match (at(v, parent), last) {
            (Value::Object(m), Seg::Key(k)) => {
                m.remove(k);
            }
            (Value::Array(a), Seg::Idx(i)) => {
                a.remove(*i);
            }
            _ => unreachable!("paths follow the value"),
        }
        fz.note(format!("json: delete {where_}"));
        return;
    }
    let node = at(v, &path);
    match (kind, &mut *node) {
        (2, Value::Array(a)) if !a.is_empty() => {
            let i = fz.below(a.len());
            a.insert(fz.below(a.len() + 1), a[i].clone());
            fz.note(format!("json: duplicate element {i} of {where_}"));
        }
        (2, Value::Object(m)) if !m.is_empty() => {
            let (k, x) = m.iter().nth(fz.below(m.len())).expect("in range");
            let (k, x) = (format!("{k}_2"), x.clone());
            fz.note(format!("json: copy {where_} key as {k:?}"));
            m.insert(k, x);
        }
        (3, Value::Number(n)) => {
            let u = n.as_u64().unwrap_or(0);
            let new = match fz.below(5) {
                0 => json!(u.wrapping_add(1)),
                1 => json!(u.wrapping_sub(1)),
                2 => json!(u.wrapping_mul(1 << 32)),
                3 => json!(-(u as i64) - 1),
                _ => json!(u as f64 + 0.5),
            };
            fz.note(format!("json: {where_} = {new}"));
            *node = new;
        }
        (4, Value::Array(a)) => {
            let what = fz.below(3);
            match what {
                0 => a.clear(),
                1 => a.push(odd_value(fz)),
                _ => a.reverse(),
            }
            fz.note(format!(
                "json: {} {where_}",
                ["clear", "push to", "reverse"][what]
            ));
        }
        (5, Value::Object(m)) => {
            let x = odd_value(fz);
            fz.note(format!("json: add key \"zz_unknown\" = {x} to {where_}"));
            m.insert("zz_unknown".into(), x);
        }
        (6, Value::String(s)) => {
            let new = match fz.below(3) {
                0 => String::new(),
                1 => format!("{s}x"),
                _ => s.chars().rev().collect(),
            };
            fz.note(format!("json: {where_} = {new:?}"));
            *s = new;
        }
        _ => {
            let x = odd_value(fz);
            fz.note(format!("json: {where_} = {x}"));
            *node = x;
        }
    }
}

/// Serializes compactly or pretty, with random extra whitespace between tokens (never inside
/// strings): a reformatting that must not change what a reader sees.
pub fn reformat(fz: &mut Fz, v: &Value) -> Vec<u8> {
    let text = if fz.chance(0.5) {
        serde_json::to_string(v).unwrap()
    } else {
        serde_json::to_string_pretty(v).unwrap()
    };
    let mut out = Vec::with_capacity(text.len() * 2);
    let (mut in_str, mut escaped) = (false, false);
    for b in text.bytes() {
        out.push(b);
        if in_str {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b',' | b':' | b'[' | b'{' if fz.chance(0.3) => {
                let ws = *fz.pick(&[" ", "\n", "\t", "  ", "\r\n"]);
                out.extend_from_slice(ws.as_bytes());
            }
            _ => {}
        }
    }
    fz.note("reformat JSON (whitespace only)");
    out
}

/// A JSON input mutated: structural edits (re-serialized), or text-level edits of its text.
pub fn json_bytes(fz: &mut Fz, v: &Value) -> Vec<u8> {
    if fz.chance(0.6) {
        let mut v = v.clone();
        for _ in 0..fz.range(1, 3) {
            json(fz, &mut v);
        }
        return serde_json::to_vec_pretty(&v).unwrap();
    }
    let text = serde_json::to_string_pretty(v).unwrap();
    let mut out = text.into_bytes();
    for _ in 0..fz.range(1, 3) {
        let s = String::from_utf8_lossy(&out).into_owned();
        out = self::text(fz, &s);
    }
    out
}
