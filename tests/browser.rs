//! The web page in real headless Chromium, driven over WebDriver (chromedriver + fantoccini):
//! load it from `duplex demo`, type a sentence, Speak, watch the frame counter rise and the
//! FAL appear, Pause and see the counter stop, Resume and see it finish; save a screenshot
//! under `target/`; Stop; then turn the microphone on (Chromium's fake capture device playing a
//! espeak-ng sentence from a WAV file) and see the gateway's voice-activity detection interrupt
//! the audio.
//!
//! Needs Debian's `chromium` and `chromium-driver` (scripts/test-all.sh installs them) and
//! espeak-ng; without them it fails with that message instead of passing silently. Every
//! wait is bounded; chromedriver and the demo are killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const WAIT: Duration = Duration::from_secs(30);
/// Bound on starting the browser (the WebDriver session). Apart from `WAIT` because a cold
/// Chromium start is the slowest step by far when the machine is loaded: a fresh-clone CI run
/// with the scale bench beside it took more than 30 s to start it.
const BROWSER_START: Duration = Duration::from_secs(180);

const SENTENCE: &str = "This is the browser test speaking. It says a few sentences, so that \
    there is time to pause it in the middle, to check that the frame counter really stops, \
    and then to resume it and hear the rest until the very end.";

fn require(path: &str, package: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: this test needs Debian's {package} \
         (apt-get install chromium chromium-driver espeak-ng; scripts/test-all.sh installs them)"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed on drop.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `cmd` until it accepts on the port `args(port)` gives it (retries on port races).
fn spawn_listening(program: &str, args: impl Fn(u16) -> Vec<String>) -> (Kill, u16) {
    for _ in 0..5 {
        let port = free_port();
        let child = Command::new(program)
            .args(args(port))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let mut child = Kill(child);
        let t0 = Instant::now();
        loop {
            if let Ok(Some(_)) = child.0.try_wait() {
                break;
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return (child, port);
            }
            assert!(t0.elapsed() < WAIT, "{program} did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("could not start {program}");
}

async fn bounded<T, E: std::fmt::Debug>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> T {
    bounded_by(WAIT, what, f).await
}

async fn bounded_by<T, E: std::fmt::Debug>(
    limit: Duration,
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> T {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("{what}: {e:?}"),
        Err(_) => panic!("{what}: timed out"),
    }
}

async fn text_of(c: &Client, id: &str) -> String {
    let el = bounded(&format!("find #{id}"), c.find(Locator::Id(id))).await;
    bounded(&format!("text of #{id}"), el.text()).await
}

async fn frames(c: &Client) -> u64 {
    let t = text_of(c, "frames").await;
    t.parse()
        .unwrap_or_else(|_| panic!("#frames is not a number: {t:?}"))
}

async fn click(c: &Client, id: &str) {
    let el = bounded(&format!("find #{id}"), c.find(Locator::Id(id))).await;
    bounded(&format!("click #{id}"), el.click()).await;
}

/// Polls until `check` holds (bounded by [`WAIT`]).
async fn wait_for<F, Fut>(c: &Client, what: &str, check: F)
where
    F: Fn(Client) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    while !check(c.clone()).await {
        if t0.elapsed() > WAIT {
            let state = text_of(c, "state").await;
            let note = text_of(c, "note").await;
            let log = c
                .execute("return document.getElementById('log').textContent;", vec![])
                .await
                .map(|v| v.to_string())
                .unwrap_or_default();
            panic!(
                "timed out waiting for {what} (state {state:?}, note {note:?}); page log:\n{log}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn screenshot_path() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser-web-page.png")
}

#[tokio::test]
async fn the_web_page_speaks_pauses_resumes_and_finishes_in_chromium() {
    require(CHROMIUM, "chromium");
    require(CHROMEDRIVER, "chromium-driver");
    require("/usr/bin/espeak-ng", "espeak-ng");

    let (_demo, demo_port) = spawn_listening(env!("CARGO_BIN_EXE_duplex"), |p| {
        vec!["demo".into(), "--listen".into(), format!("127.0.0.1:{p}")]
    });
    let (_driver, driver_port) = spawn_listening(CHROMEDRIVER, |p| vec![format!("--port={p}")]);

    let profile = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("chromium-profile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&profile);
    let voice = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("fake-microphone-{}.wav", std::process::id()));
    write_speech_wav(&voice);
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": CHROMIUM,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--autoplay-policy=no-user-gesture-required",
                "--window-size=900,1000",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                format!("--use-file-for-fake-audio-capture={}", voice.display()),
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    let client = bounded_by(
        BROWSER_START,
        "WebDriver session",
        ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{driver_port}")),
    )
    .await;
    let result = drive(&client, demo_port).await;
    let _ = tokio::time::timeout(WAIT, client.close()).await;
    let _ = std::fs::remove_dir_all(&profile);
    let _ = std::fs::remove_file(&voice);
    result
}

/// Real speech for the fake microphone: espeak-ng saying a few words into a WAV (Chromium
/// loops the file). A steady tone would not do: the page asks for noise suppression, which
/// removes stationary sounds as it should.
fn write_speech_wav(path: &Path) {
    let status = Command::new("/usr/bin/espeak-ng")
        .args(["-v", "en-us", "-a", "200", "-w"])
        .arg(path)
        .arg("Wait, stop please, I have a question about that.")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run espeak-ng");
    assert!(
        status.success(),
        "espeak-ng could not write {}",
        path.display()
    );
}

async fn drive(c: &Client, demo_port: u16) {
    bounded(
        "load the page",
        c.goto(&format!("http://127.0.0.1:{demo_port}/")),
    )
    .await;
    let title = bounded("title", c.title()).await;
    assert!(title.contains("duplex"), "{title}");
    assert_eq!(text_of(c, "state").await, "idle");

    let text = bounded("find #text", c.find(Locator::Id("text"))).await;
    bounded("clear #text", text.clear()).await;
    bounded("type", text.send_keys(SENTENCE)).await;
    click(c, "speak").await;

    wait_for(c, "the frame counter to rise", |c| async move {
        frames(&c).await > 10
    })
    .await;
    let fal = text_of(c, "fal").await;
    let ms: u64 = fal
        .strip_suffix(" ms")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("FAL is not shown as 'N ms': {fal:?}"));
    assert!(ms < 10_000, "FAL {ms} ms");
    assert_eq!(text_of(c, "state").await, "speaking");
    assert_eq!(text_of(c, "voice").await, "espeak-en-us");

    click(c, "pause").await;
    assert_eq!(text_of(c, "state").await, "paused");
    // Frames already in flight may land; then the counter stops.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at_pause = frames(c).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        frames(c).await,
        at_pause,
        "frames kept arriving while paused"
    );
    assert_ne!(text_of(c, "state").await, "done");

    click(c, "resume").await;
    wait_for(c, "the utterance to finish", |c| async move {
        text_of(&c, "state").await == "done"
    })
    .await;
    let total = frames(c).await;
    assert!(
        total > at_pause + 50,
        "resume brought the rest: {at_pause} -> {total}"
    );
    let underruns: u64 = text_of(c, "underruns")
        .await
        .parse()
        .expect("#underruns is a number");
    let audio = bounded(
        "audio state",
        c.execute("return ctx ? ctx.state : 'none';", vec![]),
    )
    .await;
    eprintln!("frames {total}, FAL {ms} ms, underruns {underruns}, AudioContext {audio}");

    let png = bounded("screenshot", c.screenshot()).await;
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    let path = screenshot_path();
    std::fs::write(&path, &png).unwrap();
    eprintln!("screenshot: {}", path.display());

    // Speak again and Stop: the counter stops for good and the state says so.
    click(c, "speak").await;
    wait_for(c, "the second utterance to play", |c| async move {
        text_of(&c, "state").await == "speaking" && frames(&c).await > 5
    })
    .await;
    click(c, "stop").await;
    assert_eq!(text_of(c, "state").await, "stopped");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let at_stop = frames(c).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(frames(c).await, at_stop, "frames after Stop");
    assert!(
        at_stop < total,
        "stopped before the end: {at_stop} of {total}"
    );
    assert_eq!(text_of(c, "state").await, "stopped");

    // Speak again and turn the microphone on: the fake device's speech is "the user talking",
    // so the gateway's voice-activity detection interrupts the audio (barge-in).
    click(c, "speak").await;
    wait_for(c, "the third utterance to play", |c| async move {
        text_of(&c, "state").await == "speaking"
    })
    .await;
    click(c, "mic").await;
    wait_for(c, "the barge-in", |c| async move {
        text_of(&c, "state").await == "interrupted"
    })
    .await;
    assert_eq!(text_of(c, "you").await, "speaking");
    assert_eq!(text_of(c, "mic").await, "Microphone: on");
    let at_barge_in = frames(c).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(frames(c).await, at_barge_in, "frames after the barge-in");
}
