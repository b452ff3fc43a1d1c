//! The espeak-ng engine: real offline speech from a managed `espeak-ng` subprocess.
//!
//! Why a subprocess and not a library binding: `apt-get install espeak-ng` is all a fresh
//! machine needs (no `-dev` headers, no C build in `cargo build`), the engine's global state
//! (libespeak-ng is not re-entrant) stays out of our multi-threaded process, a crash in it
//! cannot take the worker down, and cancelling is `kill`. The cost of a process per clause
//! is its start-up (~20 ms: loading the voice), which [`VoiceRuntime`] hides by keeping one
//! *warm* process per resident voice: already started with the voice loaded, blocked on
//! reading its stdin, so a clause only has to be written to it.
//!
//! Each clause is one process: `espeak-ng --stdin --stdout -v VOICE`, the text on stdin,
//! a streamed WAV (16-bit mono, 22 050 Hz for the standard voices) on stdout.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdout, Command};

use super::wav::WavReader;

/// The executable looked up on `PATH` by default.
pub const DEFAULT_BINARY: &str = "espeak-ng";
/// Prefix of every espeak model id (`espeak-en-us`, `espeak-de`, ...).
pub const MODEL_PREFIX: &str = "espeak-";
/// Longest wait for a finished espeak-ng process to exit after its output ended.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// What went wrong with espeak-ng.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EspeakError {
    /// The binary could not be run.
    #[error("espeak-ng is not available ({binary}: {reason}); install it with `apt-get install espeak-ng`")]
    NotInstalled {
        /// The command that was tried.
        binary: String,
        /// The OS error.
        reason: String,
    },
    /// `--voices` listed nothing usable.
    #[error("espeak-ng ({binary}) lists no voices")]
    NoVoices {
        /// The command that was tried.
        binary: String,
    },
    /// A synthesis process failed.
    #[error("espeak-ng failed: {0}")]
    Synthesis(String),
}

/// One installed espeak-ng voice, exposed as a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Voice {
    /// Model id: `espeak-` + the language tag in lowercase (`espeak-en-us`).
    pub model_id: String,
    /// What `-v` takes (the language tag as espeak-ng lists it, e.g. `en-us`).
    pub language: String,
    /// Human-readable name (`English_(America)`).
    pub name: String,
    /// Voice file inside espeak-ng-data (`gmw/en-US`).
    pub file: String,
}

impl Voice {
    /// Languages this voice speaks: its tag and, if different, the primary subtag
    /// (`en-us` → `en-us`, `en`), so a client looking for "en" finds it.
    pub fn languages(&self) -> Vec<String> {
        let tag = self.language.to_lowercase();
        let primary = tag.split('-').next().unwrap_or(&tag).to_owned();
        if primary == tag {
            vec![tag]
        } else {
            vec![tag, primary]
        }
    }
}

/// An espeak-ng installation: the binary, its version and its voices.
#[derive(Debug)]
pub struct Espeak {
    binary: PathBuf,
    version: String,
    voices: Vec<Voice>,
}

impl Espeak {
    /// Checks that `binary` runs and lists its voices. Runs two short commands: call it once
    /// at start-up, not per request.
    pub fn detect(binary: &str) -> Result<Espeak, EspeakError> {
        let not_installed = |reason: String| EspeakError::NotInstalled {
            binary: binary.to_owned(),
            reason,
        };
        let version = std::process::Command::new(binary)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| not_installed(e.to_string()))?;
        if !version.status.success() {
            return Err(not_installed(format!(
                "--version exited with {}",
                version.status
            )));
        }
        let version = parse_version(&String::from_utf8_lossy(&version.stdout));
        let list = std::process::Command::new(binary)
            .arg("--voices")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| not_installed(e.to_string()))?;
        let voices = parse_voices(&String::from_utf8_lossy(&list.stdout));
        if voices.is_empty() {
            return Err(EspeakError::NoVoices {
                binary: binary.to_owned(),
            });
        }
        Ok(Espeak {
            binary: PathBuf::from(binary),
            version,
            voices,
        })
    }

    /// The engine's version (`1.51`), for logs and model metadata.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Installed voices, in the order espeak-ng lists them.
    pub fn voices(&self) -> &[Voice] {
        &self.voices
    }

    /// The voice behind `model_id`, if installed.
    pub fn voice(&self, model_id: &str) -> Option<&Voice> {
        self.voices.iter().find(|v| v.model_id == model_id)
    }

    fn command(&self, voice: &Voice) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.args(["--stdin", "--stdout", "-v", &voice.language])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }
}

/// `eSpeak NG text-to-speech: 1.51  Data at: ...` → `1.51`.
fn parse_version(out: &str) -> String {
    out.split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or("unknown")
        .to_owned()
}

/// Parses `espeak-ng --voices`: a header line, then
/// `Pty Language Age/Gender VoiceName File Other-languages...`.
fn parse_voices(out: &str) -> Vec<Voice> {
    let mut voices: Vec<Voice> = Vec::new();
    for line in out
        .lines()
        .skip_while(|l| l.trim_start().starts_with("Pty"))
    {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 5 || f[0].parse::<u32>().is_err() {
            continue;
        }
        let language = f[1].to_owned();
        let model_id = format!("{MODEL_PREFIX}{}", language.to_lowercase());
        if voices.iter().any(|v| v.model_id == model_id) {
            continue;
        }
        voices.push(Voice {
            model_id,
            language,
            name: f[3].to_owned(),
            file: f[4].to_owned(),
        });
    }
    voices
}

/// Removes what espeak-ng should not see: control characters (a NUL would end the text).
fn clean(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// A voice ready to speak: the installation, the voice, and (while resident) one warm
/// process waiting for text.
#[derive(Debug)]
pub struct VoiceRuntime {
    espeak: Arc<Espeak>,
    voice: Voice,
    spare: Mutex<Option<Child>>,
    keep_warm: AtomicBool,
}

impl VoiceRuntime {
    /// A runtime for `voice`; cold until [`VoiceRuntime::set_warm`].
    pub fn new(espeak: Arc<Espeak>, voice: Voice) -> VoiceRuntime {
        VoiceRuntime {
            espeak,
            voice,
            spare: Mutex::new(None),
            keep_warm: AtomicBool::new(false),
        }
    }

    /// The voice this runtime speaks.
    pub fn voice(&self) -> &Voice {
        &self.voice
    }

    fn spare(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.spare.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resident voices keep a warm process; evicted ones kill it and speak cold.
    /// Must run inside a tokio runtime (it may spawn the process).
    pub fn set_warm(&self, warm: bool) {
        self.keep_warm.store(warm, Ordering::Relaxed);
        if warm {
            self.refill();
        } else {
            // Dropping the child kills it (kill_on_drop).
            self.spare().take();
        }
    }

    /// True while a warm process is waiting.
    pub fn has_spare(&self) -> bool {
        self.spare().is_some()
    }

    fn refill(&self) {
        if !self.keep_warm.load(Ordering::Relaxed) {
            return;
        }
        let mut slot = self.spare();
        if slot.is_some() {
            return;
        }
        match self.espeak.command(&self.voice).spawn() {
            Ok(child) => *slot = Some(child),
            Err(e) => {
                tracing::warn!(voice = %self.voice.model_id, "cannot start a warm espeak-ng: {e}")
            }
        }
    }

    /// Starts speaking `text`: its WAV streams from the returned process.
    pub async fn speak(&self, text: &str) -> Result<ClauseProcess, EspeakError> {
        let warm = self.spare().take().and_then(|mut c| match c.try_wait() {
            Ok(None) => Some(c),
            _ => None, // it died (killed from outside?): start a fresh one
        });
        let mut child = match warm {
            Some(c) => c,
            None => self
                .espeak
                .command(&self.voice)
                .spawn()
                .map_err(|e| EspeakError::Synthesis(format!("cannot start espeak-ng: {e}")))?,
        };
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| EspeakError::Synthesis("espeak-ng has no stdin".into()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| EspeakError::Synthesis("espeak-ng has no stdout".into()))?;
        stdin
            .write_all(clean(text).as_bytes())
            .await
            .map_err(|e| EspeakError::Synthesis(format!("cannot write to espeak-ng: {e}")))?;
        // Closing stdin is what makes espeak-ng start (it reads until end of input).
        drop(stdin);
        // Only now (this clause is already under way): the next clause, of any session,
        // finds a warm process again.
        self.refill();
        Ok(ClauseProcess { child, stdout })
    }

    /// Speaks a short phrase and checks the output: proves the voice works and pulls its data
    /// into the page cache. Returns how long it took.
    pub async fn warm_up(&self) -> Result<Duration, EspeakError> {
        let started = Instant::now();
        let mut p = self.speak("Ready.").await?;
        let mut wav = WavReader::new();
        let mut samples = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let n = p.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            wav.push(&buf[..n], &mut samples)
                .map_err(|e| EspeakError::Synthesis(format!("warm-up: {e}")))?;
        }
        p.finish().await?;
        if samples.iter().all(|&s| s == 0) {
            return Err(EspeakError::Synthesis(format!(
                "warm-up of {} produced no audio",
                self.voice.model_id
            )));
        }
        Ok(started.elapsed())
    }
}

/// One clause being spoken: read its WAV with [`ClauseProcess::read`] until 0, then
/// [`ClauseProcess::finish`]. Dropping it kills the process (how STOP and cancellation end
/// synthesis at once).
#[derive(Debug)]
pub struct ClauseProcess {
    child: Child,
    stdout: ChildStdout,
}

impl ClauseProcess {
    /// Reads the next bytes of the WAV stream (0 at the end). Cancel-safe.
    pub async fn read(&mut self, buf: &mut [u8]) -> Result<usize, EspeakError> {
        self.stdout
            .read(buf)
            .await
            .map_err(|e| EspeakError::Synthesis(format!("reading espeak-ng output: {e}")))
    }

    /// Waits for the process to exit; a non-zero exit is an error carrying its stderr.
    pub async fn finish(mut self) -> Result<(), EspeakError> {
        let status = tokio::time::timeout(EXIT_TIMEOUT, self.child.wait())
            .await
            .map_err(|_| EspeakError::Synthesis("espeak-ng did not exit".into()))?
            .map_err(|e| EspeakError::Synthesis(format!("waiting for espeak-ng: {e}")))?;
        if status.success() {
            return Ok(());
        }
        let mut err = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            let _ =
                tokio::time::timeout(Duration::from_millis(200), stderr.read_to_string(&mut err))
                    .await;
        }
        Err(EspeakError::Synthesis(format!(
            "espeak-ng exited with {status}: {}",
            err.trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str =
        "Pty Language       Age/Gender VoiceName          File                 Other Languages
 5  af              --/M      Afrikaans          gmw/af
 2  en-gb           --/M      English_(Great_Britain) gmw/en               (en 2)
 2  en-us           --/M      English_(America)  gmw/en-US            (en 3)
 5  chr-US-Qaaa-x-west --/M      Cherokee_          iro/chr
 5  de              --/M      German             gmw/de
garbage line
 2  en-us           --/M      Duplicate          gmw/en-US
";

    #[test]
    fn voices_are_parsed_into_model_ids() {
        let v = parse_voices(LISTING);
        let ids: Vec<_> = v.iter().map(|v| v.model_id.as_str()).collect();
        assert_eq!(
            ids,
            vec![
                "espeak-af",
                "espeak-en-gb",
                "espeak-en-us",
                "espeak-chr-us-qaaa-x-west",
                "espeak-de"
            ]
        );
        let us = &v[2];
        assert_eq!(us.language, "en-us");
        assert_eq!(us.name, "English_(America)");
        assert_eq!(us.file, "gmw/en-US");
        assert_eq!(us.languages(), vec!["en-us", "en"]);
        assert_eq!(v[4].languages(), vec!["de"]);
        assert_eq!(
            v[3].language, "chr-US-Qaaa-x-west",
            "-v gets the tag as listed"
        );
    }

    #[test]
    fn version_and_cleaning() {
        assert_eq!(
            parse_version("eSpeak NG text-to-speech: 1.51  Data at: /usr/lib/x"),
            "1.51"
        );
        assert_eq!(parse_version(""), "unknown");
        assert_eq!(clean("a\0b\x07c\nd"), "a b c d");
    }

    #[test]
    fn a_missing_binary_is_a_clear_error() {
        let err = Espeak::detect("/nonexistent/espeak-ng").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("apt-get install espeak-ng"), "{msg}");
        assert!(msg.contains("/nonexistent/espeak-ng"), "{msg}");
    }

    /// Runs only where espeak-ng is installed (the speech integration tests require it and
    /// fail loudly without it; this unit test just skips).
    #[tokio::test]
    async fn warm_up_speaks_when_installed() {
        let Ok(e) = Espeak::detect(DEFAULT_BINARY) else {
            eprintln!("espeak-ng not installed: skipping");
            return;
        };
        let e = Arc::new(e);
        let voice = e.voice("espeak-en-us").cloned().unwrap();
        let rt = VoiceRuntime::new(e, voice);
        rt.set_warm(true);
        assert!(rt.has_spare());
        rt.warm_up().await.unwrap();
        assert!(
            rt.has_spare(),
            "a warm process is ready again after speaking"
        );
        rt.set_warm(false);
        assert!(!rt.has_spare());
    }
}
