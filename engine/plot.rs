//! The run's loss plot (`<dump_folder>/loss.png`): training loss and validation loss against
//! the step on the left axis, the learning rate on the right one, the model, flavor and step
//! count in the title. Drawn with `plotters` into an RGB buffer, text rendered by `ab_glyph`
//! from the embedded DejaVu Sans (assets/, with its licence), so no system font is needed;
//! encoded with `png`.

use crate::error::{Error, Result};
use crate::metrics::StepMetrics;
use crate::train::validate::ValMetrics;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use std::path::Path;
use std::sync::OnceLock;

pub const WIDTH: u32 = 1000;
pub const HEIGHT: u32 = 600;
/// Series colours (matplotlib's first three, distinct for most colour-blind readers).
pub const TRAIN: RGBColor = RGBColor(31, 119, 180);
pub const VALIDATION: RGBColor = RGBColor(255, 127, 14);
pub const LR: RGBColor = RGBColor(44, 160, 44);

const FONT: &str = "sans-serif";
static DEJAVU_SANS: &[u8] = include_bytes!("assets/DejaVuSans.ttf");

/// What the title names.
pub struct RunInfo<'a> {
    pub model: &'a str,
    pub flavor: &'a str,
    /// The run's last step.
    pub steps: u64,
}

/// Draws the plot and writes it to `path`.
pub fn loss_curve_png(
    train: &[StepMetrics],
    validation: &[ValMetrics],
    run: &RunInfo,
    path: &Path,
) -> Result<()> {
    let png = render(train, validation, run)?;
    std::fs::write(path, png).map_err(|e| Error::io(path, e))
}

/// The plot as PNG bytes.
pub fn render(train: &[StepMetrics], validation: &[ValMetrics], run: &RunInfo) -> Result<Vec<u8>> {
    register_dejavu()?;
    let mut rgb = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    draw(&mut rgb, train, validation, run).map_err(|e| Error::Other(format!("loss plot: {e}")))?;
    encode(&rgb)
}

fn register_dejavu() -> Result<()> {
    static OK: OnceLock<bool> = OnceLock::new();
    let ok = *OK.get_or_init(|| register_font(FONT, FontStyle::Normal, DEJAVU_SANS).is_ok());
    ok.then_some(())
        .ok_or_else(|| Error::Other("loss plot: the embedded font does not parse".into()))
}

/// (lo, hi) of `v` with a margin, never empty.
fn span(v: impl Iterator<Item = f64>, margin: f64) -> (f64, f64) {
    let (lo, hi) = v.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * margin).max(1e-3 * hi.abs().max(1.0));
    (lo - pad, hi + pad)
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn draw(
    rgb: &mut [u8],
    train: &[StepMetrics],
    validation: &[ValMetrics],
    run: &RunInfo,
) -> DrawResult {
    let loss: Vec<(f64, f64)> = train
        .iter()
        .filter(|m| m.loss.is_finite())
        .map(|m| (m.step as f64, m.loss))
        .collect();
    let val: Vec<(f64, f64)> = validation
        .iter()
        .filter(|m| m.validation_loss.is_finite())
        .map(|m| (m.step as f64, m.validation_loss))
        .collect();
    let lr: Vec<(f64, f64)> = train
        .iter()
        .filter(|m| m.lr.is_finite())
        .map(|m| (m.step as f64, m.lr))
        .collect();
    let steps = loss.iter().chain(&val).map(|p| p.0);
    let (x0, x1) = match span(steps, 0.0) {
        (a, b) if b - a < 1.0 => (a.floor(), a.floor() + 1.0),
        (a, b) => (a.round(), b.round()),
    };
    let (y0, y1) = span(loss.iter().chain(&val).map(|p| p.1), 0.05);
    // Head room above the LR curve for the legend.
    let lr_max = lr.iter().map(|p| p.1).fold(0.0, f64::max);
    let lr_top = if lr_max > 0.0 { 1.3 * lr_max } else { 1.0 };

    let root = BitMapBackend::with_buffer(rgb, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!("{} {} \u{b7} {} steps", run.model, run.flavor, run.steps);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 26))
        .margin(14)
        .x_label_area_size(56)
        .y_label_area_size(76)
        .right_y_label_area_size(86)
        .build_cartesian_2d(x0..x1, y0..y1)?
        .set_secondary_coord(x0..x1, 0.0..lr_top);
    chart
        .configure_mesh()
        .max_light_lines(1)
        .light_line_style(RGBColor(240, 240, 240))
        .bold_line_style(RGBColor(214, 214, 214))
        .x_desc("step")
        .y_desc("loss (nats per token)")
        .axis_desc_style((FONT, 19))
        .label_style((FONT, 15))
        .x_label_formatter(&|x| format!("{}", x.round() as i64))
        .y_label_formatter(&|y| format!("{y:.2}"))
        .draw()?;
    chart
        .configure_secondary_axes()
        .y_desc("learning rate")
        .axis_desc_style((FONT, 19))
        .label_style((FONT, 15))
        .y_label_formatter(&|v| format!("{v:.1e}"))
        .draw()?;
    chart
        .draw_series(LineSeries::new(loss, TRAIN.stroke_width(2)))?
        .label("training loss")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 24, y)], TRAIN.stroke_width(3)));
    if !val.is_empty() {
        chart
            .draw_series(LineSeries::new(val, VALIDATION.stroke_width(2)).point_size(4))?
            .label("validation loss")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 24, y)], VALIDATION.stroke_width(3)));
    }
    chart
        .draw_secondary_series(DashedLineSeries::new(lr, 7, 5, LR.stroke_width(2)))?
        .label("learning rate (right axis)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 24, y)], LR.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .margin(12)
        .label_font((FONT, 16))
        .background_style(WHITE.mix(0.9))
        .border_style(RGBColor(150, 150, 150))
        .draw()?;
    root.present()?;
    Ok(())
}

fn encode(rgb: &[u8]) -> Result<Vec<u8>> {
    let err = |e: png::EncodingError| Error::Other(format!("loss plot: PNG encoding: {e}"));
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, WIDTH, HEIGHT);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().map_err(err)?;
    w.write_image_data(rgb).map_err(err)?;
    w.finish().map_err(err)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(step: u64, loss: f64, lr: f64) -> StepMetrics {
        StepMetrics {
            step,
            loss,
            grad_norm: 1.0,
            lr,
            tokens_per_s: 1.0,
            tflops: 1.0,
            mfu_pct: 1.0,
            step_time_s: 1.0,
            memory_planned_gib: 1.0,
            memory_actual_gib: 1.0,
            eta_s: 1.0,
        }
    }

    /// A falling loss, warm-up then linear decay of the LR, validation every 20 steps.
    fn history(validate: bool) -> (Vec<StepMetrics>, Vec<ValMetrics>) {
        let train = (1..=100u64)
            .map(|s| {
                let lr = 8e-4 * (s as f64 / 10.0).min(1.0) * (1.0 - s as f64 / 101.0);
                step(s, 2.0 + 8.0 * (-(s as f64) / 15.0).exp(), lr)
            })
            .collect();
        let val = (0..=5u64)
            .filter(|_| validate)
            .map(|k| ValMetrics {
                step: (20 * k).max(1),
                validation_loss: 2.2 + 7.0 * (-(20.0 * k as f64) / 15.0).exp(),
                validation_tokens: 64,
                validation_batches: 1,
                validation_time_s: 0.1,
            })
            .collect();
        (train, val)
    }

    /// RGB pixels of a decoded PNG, after checking its format and size.
    fn decode(png_bytes: &[u8]) -> Vec<[u8; 3]> {
        let mut r = png::Decoder::new(std::io::Cursor::new(png_bytes))
            .read_info()
            .unwrap();
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (WIDTH, HEIGHT));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        buf[..info.buffer_size()]
            .chunks_exact(3)
            .map(|p| [p[0], p[1], p[2]])
            .collect()
    }

    /// Pixels of colour `c` in the box x in [x0, x1), y in [y0, y1).
    fn count(
        px: &[[u8; 3]],
        (x0, x1, y0, y1): (u32, u32, u32, u32),
        c: impl Fn([u8; 3]) -> bool,
    ) -> usize {
        (y0..y1)
            .flat_map(|y| (x0..x1).map(move |x| (x, y)))
            .filter(|&(x, y)| c(px[(y * WIDTH + x) as usize]))
            .count()
    }

    const ALL: (u32, u32, u32, u32) = (0, WIDTH, 0, HEIGHT);

    fn is(c: RGBColor) -> impl Fn([u8; 3]) -> bool {
        move |p| p == [c.0, c.1, c.2]
    }

    /// Text is antialiased black: count its dark pixels.
    fn dark(p: [u8; 3]) -> bool {
        p.iter().all(|&v| v < 110)
    }

    #[test]
    fn plot_has_title_axis_titles_all_series_and_second_axis() {
        let run = RunInfo {
            model: "some_model",
            flavor: "debugmodel",
            steps: 100,
        };
        let (train, val) = history(true);
        let path = std::env::temp_dir().join(format!("titan-plot-{}.png", std::process::id()));
        loss_curve_png(&train, &val, &run, &path).unwrap();
        let px = decode(&std::fs::read(&path).unwrap());
        let _ = std::fs::remove_file(&path);
        let white = count(&px, ALL, |p| p == [255; 3]);
        assert!(
            white < px.len() * 97 / 100,
            "nearly blank: {white} white pixels"
        );
        // Each series is drawn in its own colour (lines are not antialiased).
        assert!(count(&px, ALL, is(TRAIN)) > 400);
        assert!(count(&px, ALL, is(VALIDATION)) > 200);
        assert!(count(&px, ALL, is(LR)) > 200);
        // Text where each title goes, outside the tick labels: the title (top centre), the
        // left and right axis titles (outer edges), the x axis title (bottom centre).
        let (w, h) = (WIDTH, HEIGHT);
        assert!(count(&px, (w / 3, 2 * w / 3, 0, 45), dark) > 150, "title");
        assert!(
            count(&px, (0, 30, h / 4, 3 * h / 4), dark) > 150,
            "left axis title"
        );
        assert!(
            count(&px, (w - 32, w, h / 4, 3 * h / 4), dark) > 100,
            "right axis title"
        );
        assert!(
            count(&px, (w / 3, 2 * w / 3, h - 40, h), dark) > 30,
            "x axis title"
        );
        // Right axis tick labels (the LR scale) between the plot and the right axis title.
        assert!(
            count(&px, (w - 86, w - 40, 60, h - 60), dark) > 300,
            "right tick labels"
        );

        // No validation: nothing in its colour, not even a legend entry.
        let (train, _) = history(false);
        let px = decode(&render(&train, &[], &run).unwrap());
        assert_eq!(count(&px, ALL, is(VALIDATION)), 0);
        assert!(count(&px, ALL, is(TRAIN)) > 400);
    }

    #[test]
    fn degenerate_histories_still_plot() {
        let run = RunInfo {
            model: "m",
            flavor: "f",
            steps: 1,
        };
        for train in [
            vec![],
            vec![step(1, 3.0, 0.0)],
            vec![step(1, f64::NAN, f64::NAN)],
        ] {
            decode(&render(&train, &[], &run).unwrap());
        }
    }
}
