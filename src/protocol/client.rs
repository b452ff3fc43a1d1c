//! What clients send (the `text` and `control` messages of docs/PROTOCOL.md §1.2), parsed by
//! hand rather than through serde's derive so every bad input gets a precise, stable reason
//! the client can act on ("field 'text' must not be empty", not serde's type paths).

use serde_json::Value;

/// Playback commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Pause,
    Resume,
    Stop,
}

/// A message from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    Text { text: String, is_final: bool },
    Control(Command),
}

/// Parses one client text message; the error string is what the client is told.
pub fn parse(raw: &str) -> Result<ClientMessage, String> {
    let value: Value = serde_json::from_str(raw).map_err(|e| format!("not valid JSON: {e}"))?;
    let obj = value
        .as_object()
        .ok_or_else(|| "message must be a JSON object".to_string())?;
    let kind = match obj.get("type") {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err("field 'type' must be a string".into()),
        None => return Err("missing field 'type'".into()),
    };
    match kind {
        "text" => {
            let text = match obj.get("text") {
                Some(Value::String(s)) => s,
                Some(_) => return Err("field 'text' must be a string".into()),
                None => return Err("missing field 'text'".into()),
            };
            if text.is_empty() {
                return Err("field 'text' must not be empty".into());
            }
            let is_final = match obj.get("is_final") {
                None | Some(Value::Null) => true,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err("field 'is_final' must be a boolean".into()),
            };
            Ok(ClientMessage::Text {
                text: text.clone(),
                is_final,
            })
        }
        "control" => {
            let command = match obj.get("command") {
                Some(Value::String(s)) => s.as_str(),
                Some(_) => return Err("field 'command' must be a string".into()),
                None => return Err("missing field 'command'".into()),
            };
            match command {
                "PAUSE" => Ok(ClientMessage::Control(Command::Pause)),
                "RESUME" => Ok(ClientMessage::Control(Command::Resume)),
                "STOP" => Ok(ClientMessage::Control(Command::Stop)),
                other => Err(format!(
                    "unknown command '{other}' (expected PAUSE, RESUME or STOP)"
                )),
            }
        }
        other => Err(format!("unknown message type '{other}'")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_text_and_defaults_is_final() {
        assert_eq!(
            parse(r#"{"type":"text","text":"hi"}"#),
            Ok(ClientMessage::Text {
                text: "hi".into(),
                is_final: true
            })
        );
        assert_eq!(
            parse(r#"{"type":"text","text":"hi","is_final":false,"extra":1}"#),
            Ok(ClientMessage::Text {
                text: "hi".into(),
                is_final: false
            })
        );
    }

    #[test]
    fn rejects_bad_shapes_with_reasons() {
        for (raw, needle) in [
            ("nope", "JSON"),
            ("[]", "object"),
            (r#"{"text":"x"}"#, "type"),
            (r#"{"type":"bogus"}"#, "unknown message type"),
            (r#"{"type":"text","text":""}"#, "empty"),
            (r#"{"type":"text","text":5}"#, "string"),
            (r#"{"type":"text","text":"a","is_final":"yes"}"#, "boolean"),
            (r#"{"type":"control","command":"JUMP"}"#, "unknown command"),
            (r#"{"type":"control"}"#, "command"),
        ] {
            let err = parse(raw).unwrap_err();
            assert!(err.contains(needle), "{raw}: {err}");
        }
    }
}
