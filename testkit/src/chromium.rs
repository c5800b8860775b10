//! Rendering a page in headless Chromium (Debian's `chromium`, installed by `scripts/setup`): a
//! screenshot, decoded to count what is drawn, and the DOM after parsing.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The browser `scripts/setup` installs.
pub const CHROMIUM: &str = "chromium";

/// The window the page is drawn in.
pub const WINDOW: (u32, u32) = (1100, 1500);

/// A page as Chromium drew it.
#[derive(Debug)]
pub struct Rendered {
    /// The screenshot (PNG).
    pub png: PathBuf,
    /// The DOM after parsing (`--dump-dom`).
    pub dom: String,
}

/// Chromium's arguments for a headless run with its profile in `profile`: no sandbox (tests run
/// as root), no GPU, and no network but the file itself.
fn headless(profile: &Path) -> Command {
    let mut command = Command::new(CHROMIUM);
    command
        .arg("--headless")
        .arg("--no-sandbox")
        .arg("--disable-gpu")
        .arg("--hide-scrollbars")
        .arg("--no-first-run")
        .arg("--disable-extensions")
        .arg("--disable-background-networking")
        .arg("--disable-component-update")
        .arg("--disable-sync")
        .arg("--force-device-scale-factor=1")
        // Any request to a host would fail: the page must need none.
        .arg("--host-resolver-rules=MAP * ~NOTFOUND")
        .arg(format!("--user-data-dir={}", profile.display()));
    command
}

/// Renders `page` (an HTML file) into `png`, and dumps its DOM. Panics, saying to run
/// `scripts/setup`, when Chromium is missing: a test never skips for it.
pub fn render(page: &Path, png: &Path) -> Rendered {
    let profile = tempfile::tempdir().expect("a temporary directory for Chromium's profile");
    let url = format!(
        "file://{}",
        page.canonicalize().expect("the page exists").display()
    );
    let shot = headless(&profile.path().join("shot"))
        .arg(format!("--window-size={},{}", WINDOW.0, WINDOW.1))
        .arg(format!("--screenshot={}", png.display()))
        .arg(&url)
        .output()
        .unwrap_or_else(|err| missing(&err));
    assert!(
        shot.status.success() && png.exists(),
        "chromium did not take a screenshot ({}):\n{}",
        shot.status,
        String::from_utf8_lossy(&shot.stderr)
    );
    let dump = headless(&profile.path().join("dom"))
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .unwrap_or_else(|err| missing(&err));
    assert!(
        dump.status.success(),
        "chromium --dump-dom failed ({}):\n{}",
        dump.status,
        String::from_utf8_lossy(&dump.stderr)
    );
    Rendered {
        png: png.to_path_buf(),
        dom: String::from_utf8_lossy(&dump.stdout).into_owned(),
    }
}

fn missing(err: &std::io::Error) -> ! {
    panic!(
        "cannot run `{CHROMIUM}` ({err}): the HTML report test needs Debian's chromium package; run scripts/setup"
    )
}

/// What a screenshot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pixels {
    /// Width × height.
    pub total: usize,
    /// Pixels that differ from the top-left pixel (the page's background).
    pub drawn: usize,
    /// Pixels of each colour asked about, in order.
    pub of_colour: Vec<usize>,
}

/// Decodes a PNG and counts its pixels that are not the background, and those close to each of
/// `colours` (RGB, within a small tolerance for anti-aliasing).
pub fn count_pixels(png: &Path, colours: &[[u8; 3]]) -> Pixels {
    let file = std::fs::File::open(png).expect("the screenshot exists");
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().expect("a PNG header");
    let mut buffer = vec![0; reader.output_buffer_size().expect("a sane PNG size")];
    let info = reader.next_frame(&mut buffer).expect("a PNG frame");
    let channels = info.color_type.samples();
    assert!(
        channels >= 3,
        "a colour screenshot, not {:?}",
        info.color_type
    );
    let pixels: Vec<[u8; 3]> = buffer[..info.buffer_size()]
        .chunks_exact(channels)
        .map(|p| [p[0], p[1], p[2]])
        .collect();
    let background = pixels.first().copied().unwrap_or([255, 255, 255]);
    let near = |a: [u8; 3], b: [u8; 3]| a.iter().zip(b).all(|(x, y)| x.abs_diff(y) <= 6);
    Pixels {
        total: pixels.len(),
        drawn: pixels.iter().filter(|p| **p != background).count(),
        of_colour: colours
            .iter()
            .map(|c| pixels.iter().filter(|p| near(**p, *c)).count())
            .collect(),
    }
}
