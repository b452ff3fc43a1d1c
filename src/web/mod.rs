//! The web client served at `GET /`: a page to type a sentence, hear it, and watch the
//! gateway's figures (first-audio latency, frames, underruns, state) live.
//!
//! The files are plain HTML/CSS/JS in `static/`, compiled into the binary with
//! `include_bytes!`: nothing to build with npm, nothing to deploy beside the binary, and the
//! page always matches the server that serves it. Playback runs in an AudioWorklet (a small
//! jitter buffer of 48 kHz samples, see `static/audio-worklet.js`); the page talks the
//! binary WebSocket format (`?format=binary`) so audio needs no base64 decoding.

/// One static file of the web client.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    /// The `Content-Type` to send.
    pub content_type: &'static str,
    /// The file's bytes.
    pub body: &'static [u8],
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// Every file of the page, by request path.
const ASSETS: &[(&str, Asset)] = &[
    (
        "/",
        Asset {
            content_type: HTML,
            body: include_bytes!("static/index.html"),
        },
    ),
    (
        "/index.html",
        Asset {
            content_type: HTML,
            body: include_bytes!("static/index.html"),
        },
    ),
    (
        "/app.js",
        Asset {
            content_type: JS,
            body: include_bytes!("static/app.js"),
        },
    ),
    (
        "/audio-worklet.js",
        Asset {
            content_type: JS,
            body: include_bytes!("static/audio-worklet.js"),
        },
    ),
    (
        "/style.css",
        Asset {
            content_type: CSS,
            body: include_bytes!("static/style.css"),
        },
    ),
];

/// The file served at `path` (without query string), if the page has one there.
pub fn asset(path: &str) -> Option<Asset> {
    ASSETS.iter().find(|(p, _)| *p == path).map(|(_, a)| *a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_and_its_assets_are_served_with_their_types() {
        let index = asset("/").unwrap();
        assert!(index.content_type.starts_with("text/html"));
        let html = std::str::from_utf8(index.body).unwrap();
        // Every asset the page references exists.
        for reference in ["/app.js", "/style.css"] {
            assert!(
                html.contains(reference),
                "index.html must reference {reference}"
            );
            assert!(asset(reference).is_some(), "{reference} must be served");
        }
        let app = std::str::from_utf8(asset("/app.js").unwrap().body).unwrap();
        assert!(app.contains("/audio-worklet.js"));
        let worklet = asset("/audio-worklet.js").unwrap();
        assert!(worklet.content_type.starts_with("text/javascript"));
        assert!(std::str::from_utf8(worklet.body)
            .unwrap()
            .contains("registerProcessor('duplex-player'"));
        for id in [
            "speak",
            "pause",
            "resume",
            "stop",
            "fal",
            "frames",
            "underruns",
            "state",
            "level",
            "spark",
            "voices",
        ] {
            assert!(
                html.contains(&format!("id=\"{id}\"")),
                "element #{id} missing"
            );
        }
        assert!(asset("/nope").is_none());
        assert!(asset("/static/app.js").is_none());
    }
}
