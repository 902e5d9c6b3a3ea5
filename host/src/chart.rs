//! Minimal PNG bar and line charts for the offline tools (`vllm-router policy replay`,
//! the soak): a canvas
//! of RGB pixels, filled rectangles, 8x8 bitmap text (font8x8), and a PNG encoder with
//! stored (uncompressed) deflate blocks. No image library: the charts are a few hundred
//! KB and written once per run.

use font8x8::legacy::BASIC_LEGACY;

/// RGB colour.
pub type Rgb = [u8; 3];

/// Colours of the series (A, B, ...).
pub const SERIES: [Rgb; 4] = [
    [52, 101, 164],
    [230, 126, 34],
    [39, 174, 96],
    [142, 68, 173],
];

/// An RGB image, row-major.
pub struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    /// A white canvas of `w` x `h` pixels.
    pub fn new(w: usize, h: usize) -> Canvas {
        Canvas {
            w,
            h,
            px: vec![255; w * h * 3],
        }
    }

    /// Fill the rectangle at (`x`, `y`) of size `w` x `h` (clipped to the canvas).
    pub fn rect(&mut self, x: usize, y: usize, w: usize, h: usize, c: Rgb) {
        for yy in y.min(self.h)..(y + h).min(self.h) {
            for xx in x.min(self.w)..(x + w).min(self.w) {
                let i = (yy * self.w + xx) * 3;
                self.px[i..i + 3].copy_from_slice(&c);
            }
        }
    }

    /// ASCII text with its top-left corner at (`x`, `y`), each glyph 8x8 pixels times
    /// `scale`. Non-ASCII characters are drawn as `?`.
    pub fn text(&mut self, x: usize, y: usize, s: &str, c: Rgb, scale: usize) {
        for (i, ch) in s.chars().enumerate() {
            let glyph = BASIC_LEGACY[if ch.is_ascii() {
                ch as usize
            } else {
                b'?' as usize
            }];
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits >> col & 1 == 1 {
                        self.rect(x + (i * 8 + col) * scale, y + row * scale, scale, scale, c);
                    }
                }
            }
        }
    }

    /// Encode as PNG (8-bit RGB, no interlace, stored deflate blocks).
    pub fn png(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity((self.w * 3 + 1) * self.h);
        for row in self.px.chunks(self.w * 3) {
            raw.push(0); // filter: none
            raw.extend_from_slice(row);
        }
        let mut z = vec![0x78, 0x01];
        let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
        for (i, b) in blocks.iter().enumerate() {
            z.push(u8::from(i + 1 == blocks.len()));
            let n = b.len() as u16;
            z.extend_from_slice(&n.to_le_bytes());
            z.extend_from_slice(&(!n).to_le_bytes());
            z.extend_from_slice(b);
        }
        z.extend_from_slice(&adler32(&raw).to_be_bytes());
        let mut out = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&(self.w as u32).to_be_bytes());
        ihdr.extend_from_slice(&(self.h as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        chunk(&mut out, b"IHDR", &ihdr);
        chunk(&mut out, b"IDAT", &z);
        chunk(&mut out, b"IEND", &[]);
        out
    }
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// CRC-32 (IEEE, as PNG specifies), bitwise.
fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 == 1 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + x as u32) % 65_521;
        b = (b + a) % 65_521;
    }
    b << 16 | a
}

/// One panel of grouped bars: `groups` labels along the x axis, one bar per series.
pub struct Panel<'a> {
    /// Panel title.
    pub title: &'a str,
    /// Label under each group.
    pub groups: Vec<String>,
    /// `values[series][group]`.
    pub values: Vec<Vec<f64>>,
    /// Format of the value printed above a bar.
    pub fmt: fn(f64) -> String,
}

/// Draw panels side by side with a legend of `series` names; returns the PNG bytes.
pub fn bar_chart(title: &str, series: &[String], panels: &[Panel<'_>]) -> Vec<u8> {
    let (pw, ph) = (420usize, 320usize);
    let mut c = Canvas::new(pw * panels.len().max(1) + 20, ph + 110);
    c.text(10, 8, title, [0, 0, 0], 2);
    for (i, s) in series.iter().enumerate() {
        let x = 10 + i * 260;
        c.rect(x, 36, 14, 14, SERIES[i % SERIES.len()]);
        c.text(x + 20, 39, s, [0, 0, 0], 1);
    }
    for (p, panel) in panels.iter().enumerate() {
        let (x0, y0) = (10 + p * pw, 70usize);
        c.text(x0, y0, panel.title, [0, 0, 0], 1);
        let top = y0 + 30;
        let base = top + ph - 60;
        c.rect(x0, base, pw - 20, 1, [0, 0, 0]);
        let max = panel
            .values
            .iter()
            .flatten()
            .cloned()
            .fold(0.0f64, f64::max)
            .max(1e-9);
        let ng = panel.groups.len().max(1);
        let gw = (pw - 30) / ng;
        let bw = (gw.saturating_sub(8) / panel.values.len().max(1)).max(2);
        for (g, label) in panel.groups.iter().enumerate() {
            let gx = x0 + 5 + g * gw;
            for (s, vals) in panel.values.iter().enumerate() {
                let v = vals.get(g).copied().unwrap_or(0.0);
                let h = ((v / max) * (base - top - 20) as f64) as usize;
                let bx = gx + s * bw;
                c.rect(bx, base - h, bw - 1, h, SERIES[s % SERIES.len()]);
                if bw >= 24 || panel.values.len() == 1 {
                    c.text(bx, base - h - 10, &(panel.fmt)(v), [60, 60, 60], 1);
                }
            }
            c.text(gx, base + 6, label, [0, 0, 0], 1);
        }
    }
    c.png()
}

/// One panel of lines over a shared x axis.
pub struct LinePanel<'a> {
    /// Panel title (with the unit).
    pub title: &'a str,
    /// x of every point (e.g. seconds since start).
    pub x: &'a [f64],
    /// `(name, y values)` per line, `y.len() == x.len()`.
    pub lines: Vec<(&'a str, Vec<f64>)>,
}

/// Draw line panels stacked vertically (y from 0 to the panel's max, labelled); returns
/// the PNG bytes. For time series of long-running tools (soak: RSS, fds, request rate).
pub fn line_chart(title: &str, panels: &[LinePanel<'_>]) -> Vec<u8> {
    let (pw, ph) = (900usize, 220usize);
    let mut c = Canvas::new(pw + 20, 40 + panels.len() * (ph + 30));
    c.text(10, 8, title, [0, 0, 0], 2);
    for (p, panel) in panels.iter().enumerate() {
        let (x0, y0) = (60usize, 40 + p * (ph + 30));
        c.text(10, y0, panel.title, [0, 0, 0], 1);
        for (i, (name, _)) in panel.lines.iter().enumerate() {
            let lx = pw - 200 + i * 100;
            c.rect(lx, y0, 10, 8, SERIES[i % SERIES.len()]);
            c.text(lx + 14, y0, name, [0, 0, 0], 1);
        }
        let (top, base) = (y0 + 14, y0 + ph);
        let w = pw - x0 - 10;
        c.rect(x0, top, 1, base - top, [0, 0, 0]);
        c.rect(x0, base, w, 1, [0, 0, 0]);
        let ymax = panel
            .lines
            .iter()
            .flat_map(|(_, v)| v.iter().cloned())
            .fold(0.0f64, f64::max)
            .max(1e-9);
        let (xmin, xmax) = (
            panel.x.first().copied().unwrap_or(0.0),
            panel.x.last().copied().unwrap_or(1.0),
        );
        let span = (xmax - xmin).max(1e-9);
        c.text(4, top, &format_axis(ymax), [60, 60, 60], 1);
        c.text(4, base - 8, "0", [60, 60, 60], 1);
        c.text(x0, base + 4, &format_axis(xmin), [60, 60, 60], 1);
        c.text(x0 + w - 40, base + 4, &format_axis(xmax), [60, 60, 60], 1);
        let to_px = |x: f64, y: f64| {
            let px = x0 as f64 + (x - xmin) / span * w as f64;
            let py = base as f64 - (y / ymax) * (base - top) as f64;
            (px, py)
        };
        for (i, (_, ys)) in panel.lines.iter().enumerate() {
            let col = SERIES[i % SERIES.len()];
            let pts: Vec<(f64, f64)> = panel.x.iter().zip(ys).map(|(x, y)| to_px(*x, *y)).collect();
            for seg in pts.windows(2) {
                let ((ax, ay), (bx, by)) = (seg[0], seg[1]);
                let steps = ((bx - ax).abs().max((by - ay).abs()) as usize).max(1);
                for k in 0..=steps {
                    let t = k as f64 / steps as f64;
                    let (x, y) = (ax + (bx - ax) * t, ay + (by - ay) * t);
                    c.rect(x as usize, (y as usize).saturating_sub(1), 2, 2, col);
                }
            }
        }
    }
    c.png()
}

fn format_axis(v: f64) -> String {
    if v >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_png_is_well_formed() {
        let mut c = Canvas::new(3, 2);
        c.rect(0, 0, 1, 1, [255, 0, 0]);
        let png = c.png();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&png[12..16], b"IHDR");
        assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 3);
        // Known CRC-32 of "IEND" with no data: AE 42 60 82.
        assert_eq!(&png[png.len() - 4..], &[0xAE, 0x42, 0x60, 0x82]);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926); // the CRC-32 check value
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
    }

    #[test]
    fn a_line_chart_draws_its_lines() {
        let x = [0.0, 1.0, 2.0];
        let png = line_chart(
            "t",
            &[LinePanel {
                title: "p",
                x: &x,
                lines: vec![("a", vec![0.0, 5.0, 10.0])],
            }],
        );
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        // The line's colour is in the image (stored blocks: raw pixels are in the file).
        let blue = SERIES[0];
        assert!(png.windows(3).any(|w| w == blue));
    }
}
