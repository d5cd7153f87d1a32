//! The loss curve as a PNG, with no plotting or image dependency: a small raster, a 3x5 digit
//! font for the axis labels, and a PNG writer using stored (uncompressed) deflate blocks.

use crate::error::{Error, Result};
use crate::metrics::StepMetrics;
use std::path::Path;

const W: usize = 800;
const H: usize = 480;
const L: usize = 70; // left margin
const B: usize = 40; // bottom margin
const T: usize = 20;
const R: usize = 20;

struct Canvas {
    px: Vec<[u8; 3]>,
}

impl Canvas {
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            self.px[y as usize * W + x as usize] = c;
        }
    }
    fn line(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
        let n = (x1 - x0).abs().max((y1 - y0).abs()).max(1);
        for i in 0..=n {
            let x = x0 + (x1 - x0) * i / n;
            let y = y0 + (y1 - y0) * i / n;
            self.set(x, y, c);
            self.set(x, y + 1, c);
        }
    }
    /// Digits, '.', '-', 'e' in a 3x5 font, scaled 2x.
    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            let g: [u8; 5] = match ch {
                '0' => [7, 5, 5, 5, 7],
                '1' => [2, 6, 2, 2, 7],
                '2' => [7, 1, 7, 4, 7],
                '3' => [7, 1, 7, 1, 7],
                '4' => [5, 5, 7, 1, 1],
                '5' => [7, 4, 7, 1, 7],
                '6' => [7, 4, 7, 5, 7],
                '7' => [7, 1, 1, 1, 1],
                '8' => [7, 5, 7, 5, 7],
                '9' => [7, 5, 7, 1, 7],
                '.' => [0, 0, 0, 0, 2],
                '-' => [0, 0, 7, 0, 0],
                'e' => [0, 7, 7, 4, 7],
                _ => [0; 5],
            };
            for (row, bits) in g.iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        for d in 0..4 {
                            let px = x + (i as i64) * 8 + col as i64 * 2 + (d % 2);
                            let py = y + row as i64 * 2 + (d / 2);
                            self.set(px, py, c);
                        }
                    }
                }
            }
        }
    }
}

/// Draws loss against step and writes `path`.
pub fn loss_curve_png(hist: &[StepMetrics], path: &Path) -> Result<()> {
    let mut cv = Canvas {
        px: vec![[255, 255, 255]; W * H],
    };
    let pts: Vec<(f64, f64)> = hist
        .iter()
        .filter(|m| m.loss.is_finite())
        .map(|m| (m.step as f64, m.loss))
        .collect();
    let (pw, ph) = ((W - L - R) as f64, (H - T - B) as f64);
    let axis = [40, 40, 40];
    cv.line(L as i64, T as i64, L as i64, (H - B) as i64, axis);
    cv.line(
        L as i64,
        (H - B) as i64,
        (W - R) as i64,
        (H - B) as i64,
        axis,
    );
    if let (Some(first), Some(last)) = (pts.first(), pts.last()) {
        let (x0, x1) = (first.0, last.0.max(first.0 + 1.0));
        let lo = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let hi = pts.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        let (y0, y1) = (lo.min(hi - 1e-6), hi.max(lo + 1e-6));
        let sx = |x: f64| L as f64 + (x - x0) / (x1 - x0) * pw;
        let sy = |y: f64| T as f64 + (1.0 - (y - y0) / (y1 - y0)) * ph;
        for i in 0..=4 {
            let v = y0 + (y1 - y0) * i as f64 / 4.0;
            let y = sy(v) as i64;
            cv.line(L as i64 - 5, y, L as i64, y, axis);
            cv.text(4, y - 5, &format!("{v:.3}"), axis);
            let s = x0 + (x1 - x0) * i as f64 / 4.0;
            let x = sx(s) as i64;
            cv.line(x, (H - B) as i64, x, (H - B + 5) as i64, axis);
            cv.text(
                x - 12,
                (H - B + 10) as i64,
                &format!("{}", s.round() as u64),
                axis,
            );
        }
        for w in pts.windows(2) {
            cv.line(
                sx(w[0].0) as i64,
                sy(w[0].1) as i64,
                sx(w[1].0) as i64,
                sy(w[1].1) as i64,
                [200, 40, 40],
            );
        }
    }
    let png = encode_png(&cv.px, W, H);
    std::fs::write(path, png).map_err(|e| Error::io(path, e))
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
}

/// RGB8 image -> PNG bytes (zlib stream of stored blocks).
pub fn encode_png(px: &[[u8; 3]], w: usize, h: usize) -> Vec<u8> {
    let mut raw = Vec::with_capacity(h * (1 + 3 * w));
    for row in px.chunks(w) {
        raw.push(0);
        for p in row {
            raw.extend_from_slice(p);
        }
    }
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65535).collect();
    for (i, blk) in blocks.iter().enumerate() {
        z.push((i + 1 == blocks.len()) as u8);
        let n = blk.len() as u16;
        z.extend_from_slice(&n.to_le_bytes());
        z.extend_from_slice(&(!n).to_le_bytes());
        z.extend_from_slice(blk);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &x in &raw {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    z.extend_from_slice(&((b << 16) | a).to_be_bytes());
    let mut out = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&(w as u32).to_be_bytes());
    ihdr.extend_from_slice(&(h as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &z);
    chunk(&mut out, b"IEND", &[]);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn crc_matches_known_value() {
        assert_eq!(super::crc32(b"123456789"), 0xCBF4_3926);
    }
}
