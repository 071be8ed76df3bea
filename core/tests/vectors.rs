//! Checks the core against the known-answer vectors in `spec/vectors/*.json`.
//!
//! The vectors are written by `spec/vectors/generate.py`, an independent implementation of
//! `spec/protocol.md` in Python; this file only reads them. Every assertion names the vector
//! case it checks.

use std::collections::BTreeSet;
use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;

use dialback_core::crypto::{PasswordKey, SessionKeys};
use dialback_core::data::{encode_accept, encode_data_hello, Classified, Intake, IntakeError};
use dialback_core::wire::{
    encode_preamble, parse_preamble, ConnKind, Connect, ConnectFailed, DataBind, DataHello,
    ErrorFrame, FrameDecoder, Hello, Message, Prepare, Welcome, WireError,
};
use dialback_core::ErrorCode;
use serde::Deserialize;
use serde_json::{json, Value};

/// The vector files some test checks; a new vector file must get a test before it is listed.
/// (`ntlm.json` is checked by `ntlm_vectors.rs`, `proxy_protocol.json` by `proxy_vectors.rs`.)
const FILES: &[&str] = &[
    "frames.json",
    "keys.json",
    "ntlm.json",
    "preamble.json",
    "proofs.json",
    "proxy_protocol.json",
    "tokens.json",
];

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../spec/vectors")
}

fn load<T: for<'de> Deserialize<'de>>(name: &str) -> T {
    let path = vectors_dir().join(name);
    let text =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("cannot parse {}: {e}", path.display()))
}

fn bytes(hex_str: &str, what: &str) -> Vec<u8> {
    hex::decode(hex_str).unwrap_or_else(|e| panic!("{what}: bad hex {hex_str:?}: {e}"))
}

fn array<const N: usize>(hex_str: &str, what: &str) -> [u8; N] {
    let v = bytes(hex_str, what);
    v.as_slice()
        .try_into()
        .unwrap_or_else(|_| panic!("{what}: expected {N} bytes, got {}", v.len()))
}

fn id64(s: &str, what: &str) -> u64 {
    s.parse()
        .unwrap_or_else(|e| panic!("{what}: bad 64-bit id {s:?}: {e}"))
}

#[test]
fn every_vector_file_is_checked() {
    let dir = vectors_dir();
    let found: BTreeSet<String> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    let known: BTreeSet<String> = FILES.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        found, known,
        "vector files on disk vs. files this test checks"
    );
}

// ---------------------------------------------------------------------------------------------
// keys.json, proofs.json, tokens.json
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct KeysFile {
    pbkdf2_rounds: u32,
    cases: Vec<KeyCase>,
}

#[derive(Deserialize)]
struct KeyCase {
    name: String,
    service: String,
    service_utf8: String,
    password: String,
    password_utf8: String,
    exporter: String,
    password_key: String,
    agent_proof_key: String,
    gateway_proof_key: String,
    session_key: String,
}

#[test]
fn keys() {
    let file: KeysFile = load("keys.json");
    assert_eq!(
        file.pbkdf2_rounds,
        dialback_core::crypto::PBKDF2_ROUNDS,
        "keys.json: PBKDF2 rounds"
    );
    assert!(!file.cases.is_empty(), "keys.json has no cases");
    for c in &file.cases {
        let n = &c.name;
        assert_eq!(
            hex::encode(c.service.as_bytes()),
            c.service_utf8,
            "{n}: service bytes"
        );
        assert_eq!(
            hex::encode(c.password.as_bytes()),
            c.password_utf8,
            "{n}: password bytes"
        );
        let pk = PasswordKey::derive(&c.service, &c.password);
        assert_eq!(
            hex::encode(pk.as_bytes()),
            c.password_key,
            "{n}: password_key"
        );
        let keys = SessionKeys::derive(&pk, &array(&c.exporter, n));
        assert_eq!(
            hex::encode(keys.agent_proof_key),
            c.agent_proof_key,
            "{n}: agent_proof_key"
        );
        assert_eq!(
            hex::encode(keys.gateway_proof_key),
            c.gateway_proof_key,
            "{n}: gateway_proof_key"
        );
        assert_eq!(
            hex::encode(keys.session_key),
            c.session_key,
            "{n}: session_key"
        );
    }
}

#[derive(Deserialize)]
struct Cases<T> {
    cases: Vec<T>,
}

#[derive(Deserialize)]
struct ProofCase {
    name: String,
    service: String,
    password_key: String,
    exporter: String,
    agent_nonce: String,
    gateway_nonce: String,
    session_id: String,
    agent_proof: String,
    gateway_proof: String,
}

#[test]
fn proofs() {
    let file: Cases<ProofCase> = load("proofs.json");
    assert!(!file.cases.is_empty(), "proofs.json has no cases");
    for c in &file.cases {
        let n = &c.name;
        let pk = PasswordKey::from_bytes(array(&c.password_key, n));
        let keys = SessionKeys::derive(&pk, &array(&c.exporter, n));
        let agent_nonce = array(&c.agent_nonce, n);
        let agent_proof = keys.agent_proof(&c.service, &agent_nonce);
        assert_eq!(hex::encode(agent_proof), c.agent_proof, "{n}: agent_proof");
        // The gateway proof covers the agent proof as received, i.e. the vector's value.
        let gateway_proof = keys.gateway_proof(
            &c.service,
            &agent_nonce,
            &array(&c.gateway_nonce, n),
            &array(&c.agent_proof, n),
            id64(&c.session_id, n),
        );
        assert_eq!(
            hex::encode(gateway_proof),
            c.gateway_proof,
            "{n}: gateway_proof"
        );
    }
}

#[derive(Deserialize)]
struct TokenCase {
    name: String,
    service: String,
    password_key: String,
    exporter: String,
    session_key: String,
    session_id: String,
    request_id: String,
    random16: String,
    token: String,
}

#[test]
fn tokens() {
    let file: Cases<TokenCase> = load("tokens.json");
    assert!(!file.cases.is_empty(), "tokens.json has no cases");
    for c in &file.cases {
        let n = &c.name;
        let pk = PasswordKey::from_bytes(array(&c.password_key, n));
        let keys = SessionKeys::derive(&pk, &array(&c.exporter, n));
        assert_eq!(
            hex::encode(keys.session_key),
            c.session_key,
            "{n}: session_key"
        );
        let token = keys.data_token(
            id64(&c.session_id, n),
            id64(&c.request_id, n),
            &c.service,
            &array(&c.random16, n),
        );
        assert_eq!(hex::encode(token), c.token, "{n}: token");
    }
}

// ---------------------------------------------------------------------------------------------
// frames.json
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct FramesFile {
    max_frame_payload: usize,
    types: std::collections::BTreeMap<String, u8>,
    error_codes: std::collections::BTreeMap<String, u16>,
    valid: Vec<ValidFrame>,
    invalid: Vec<InvalidFrame>,
    streams: Vec<Stream>,
}

#[derive(Deserialize)]
struct ValidFrame {
    name: String,
    message: String,
    fields: Value,
    frame: String,
    round_trip: bool,
}

#[derive(Deserialize)]
struct InvalidFrame {
    name: String,
    frame: String,
    error: Value,
}

#[derive(Deserialize)]
struct Stream {
    name: String,
    bytes: String,
    frames: Vec<StreamFrame>,
    rest: String,
}

#[derive(Deserialize)]
struct StreamFrame {
    message: String,
    fields: Value,
}

fn field<'a>(f: &'a Value, key: &str, what: &str) -> &'a Value {
    f.get(key)
        .unwrap_or_else(|| panic!("{what}: field {key:?} missing"))
}

fn f_str(f: &Value, key: &str, what: &str) -> String {
    field(f, key, what)
        .as_str()
        .unwrap_or_else(|| panic!("{what}: field {key:?} is not a string"))
        .to_owned()
}

fn f_uint(f: &Value, key: &str, what: &str) -> u64 {
    field(f, key, what)
        .as_u64()
        .unwrap_or_else(|| panic!("{what}: field {key:?} is not an unsigned integer"))
}

fn f_u32(f: &Value, key: &str, what: &str) -> u32 {
    u32::try_from(f_uint(f, key, what)).unwrap_or_else(|_| panic!("{what}: {key:?} exceeds u32"))
}

fn f_u16(f: &Value, key: &str, what: &str) -> u16 {
    u16::try_from(f_uint(f, key, what)).unwrap_or_else(|_| panic!("{what}: {key:?} exceeds u16"))
}

fn f_u8(f: &Value, key: &str, what: &str) -> u8 {
    u8::try_from(f_uint(f, key, what)).unwrap_or_else(|_| panic!("{what}: {key:?} exceeds u8"))
}

fn f_id(f: &Value, key: &str, what: &str) -> u64 {
    id64(&f_str(f, key, what), what)
}

fn f_bytes32(f: &Value, key: &str, what: &str) -> [u8; 32] {
    array(&f_str(f, key, what), &format!("{what}: {key}"))
}

fn f_addr(f: &Value, key: &str, what: &str) -> Option<SocketAddr> {
    match field(f, key, what) {
        Value::Null => None,
        Value::String(s) => Some(
            s.parse()
                .unwrap_or_else(|e| panic!("{what}: {key:?} = {s:?} is not an address: {e}")),
        ),
        other => panic!("{what}: {key:?} = {other} is neither null nor a string"),
    }
}

fn data_hello(f: &Value, what: &str) -> DataHello {
    DataHello {
        service: f_str(f, "service", what),
        session_id: f_id(f, "session_id", what),
        request_id: f_id(f, "request_id", what),
        token: f_bytes32(f, "token", what),
    }
}

/// The message a vector describes.
fn message(name: &str, f: &Value, what: &str) -> Message {
    match name {
        "HELLO" => Message::Hello(Hello {
            service: f_str(f, "service", what),
            agent_nonce: f_bytes32(f, "agent_nonce", what),
            proof: f_bytes32(f, "proof", what),
            software: f_str(f, "software", what),
        }),
        "WELCOME" => Message::Welcome(Welcome {
            gateway_nonce: f_bytes32(f, "gateway_nonce", what),
            proof: f_bytes32(f, "proof", what),
            session_id: f_id(f, "session_id", what),
            heartbeat_ms: f_u32(f, "heartbeat_ms", what),
            dead_after_ms: f_u32(f, "dead_after_ms", what),
            flags: f_u8(f, "flags", what),
        }),
        "HEARTBEAT" => Message::Heartbeat,
        "CONNECT" => Message::Connect(Connect {
            request_id: f_id(f, "request_id", what),
            token: f_bytes32(f, "token", what),
            client: f_addr(f, "client", what),
            public: f_addr(f, "public", what),
        }),
        "CONNECT_FAILED" => Message::ConnectFailed(ConnectFailed {
            request_id: f_id(f, "request_id", what),
            code: ErrorCode::from_u16(f_u16(f, "code", what)),
            message: f_str(f, "message", what),
        }),
        "ERROR" => Message::Error(ErrorFrame {
            code: ErrorCode::from_u16(f_u16(f, "code", what)),
            message: f_str(f, "message", what),
        }),
        "DATA_HELLO" => Message::DataHello(data_hello(f, what)),
        "DATA_ACCEPT" => Message::DataAccept,
        "PREPARE" => Message::Prepare(Prepare {
            request_id: f_id(f, "request_id", what),
            token: f_bytes32(f, "token", what),
        }),
        "DATA_BIND" => Message::DataBind(DataBind {
            client: f_addr(f, "client", what),
            public: f_addr(f, "public", what),
        }),
        "EXTENSION" => Message::Ignorable(f_u8(f, "type", what)),
        other => panic!("{what}: unknown message {other:?} in the vectors"),
    }
}

/// A decoding error in the vectors' notation.
fn wire_error_json(e: &WireError) -> Value {
    match e {
        WireError::BadMagic => json!({ "kind": "BadMagic" }),
        WireError::UnsupportedVersion(v) => json!({ "kind": "UnsupportedVersion", "value": v }),
        WireError::BadKind(v) => json!({ "kind": "BadKind", "value": v }),
        WireError::FrameTooLarge(v) => json!({ "kind": "FrameTooLarge", "value": v }),
        WireError::UnknownType(v) => json!({ "kind": "UnknownType", "value": v }),
        WireError::Malformed { msg, what } => {
            json!({ "kind": "Malformed", "msg": msg, "what": what })
        }
    }
}

/// Decodes one frame from the whole input at once; returns it and the bytes left over.
fn decode_whole(input: &[u8]) -> (Result<Option<Message>, WireError>, Vec<u8>) {
    let mut rest = input;
    let r = FrameDecoder::new().decode(&mut rest);
    (r, rest.to_vec())
}

/// Feeds one byte at a time; returns the first non-`Ok(None)` result and at which byte it came.
fn decode_bytewise(input: &[u8]) -> Option<(usize, Result<Option<Message>, WireError>)> {
    let mut d = FrameDecoder::new();
    for (i, b) in input.iter().enumerate() {
        let mut one = std::slice::from_ref(b);
        match d.decode(&mut one) {
            Ok(None) => assert!(one.is_empty(), "byte {i} was neither used nor answered"),
            r => return Some((i, r)),
        }
    }
    None
}

#[test]
fn frame_tables() {
    use dialback_core::wire::{msg_type, MAX_FRAME_PAYLOAD};
    let file: FramesFile = load("frames.json");
    assert_eq!(
        file.max_frame_payload, MAX_FRAME_PAYLOAD,
        "frames.json: max_frame_payload"
    );
    let ours = [
        ("HELLO", msg_type::HELLO),
        ("WELCOME", msg_type::WELCOME),
        ("HEARTBEAT", msg_type::HEARTBEAT),
        ("CONNECT", msg_type::CONNECT),
        ("CONNECT_FAILED", msg_type::CONNECT_FAILED),
        ("ERROR", msg_type::ERROR),
        ("PREPARE", msg_type::PREPARE),
        ("DATA_HELLO", msg_type::DATA_HELLO),
        ("DATA_ACCEPT", msg_type::DATA_ACCEPT),
        ("DATA_BIND", msg_type::DATA_BIND),
    ];
    let ours: std::collections::BTreeMap<String, u8> =
        ours.iter().map(|(n, t)| (n.to_string(), *t)).collect();
    assert_eq!(file.types, ours, "frames.json: message type numbers");
    assert!(!file.error_codes.is_empty(), "frames.json: no error codes");
    for (name, num) in &file.error_codes {
        let code = ErrorCode::from_u16(*num);
        assert_eq!(code.name(), name.to_lowercase(), "error code {num}: name");
        assert_eq!(code.to_u16(), *num, "error code {name}: number");
    }
    // Codes are numbered 1..=N without gaps; N + 1 must be unknown to this implementation.
    let next = u16::try_from(file.error_codes.len() + 1).expect("few error codes");
    assert_eq!(
        ErrorCode::from_u16(next),
        ErrorCode::Other(next),
        "the vectors list every error code this implementation knows"
    );
}

#[test]
fn valid_frames() {
    let file: FramesFile = load("frames.json");
    assert!(!file.valid.is_empty(), "frames.json has no valid frames");
    for c in &file.valid {
        let n = &c.name;
        let frame = bytes(&c.frame, n);
        let want = message(&c.message, &c.fields, n);
        if c.round_trip {
            assert_eq!(
                hex::encode(want.to_frame()),
                c.frame,
                "{n}: Message::encode"
            );
            let mut appended = vec![0xAA];
            want.encode(&mut appended);
            assert_eq!(
                appended[1..],
                frame[..],
                "{n}: encode appends after existing bytes"
            );
        }
        let (got, rest) = decode_whole(&frame);
        assert_eq!(
            got,
            Ok(Some(want.clone())),
            "{n}: FrameDecoder::decode (whole frame)"
        );
        assert!(
            rest.is_empty(),
            "{n}: decoder left {} bytes of the frame",
            rest.len()
        );
        let bytewise = decode_bytewise(&frame);
        assert_eq!(
            bytewise,
            Some((frame.len() - 1, Ok(Some(want)))),
            "{n}: FrameDecoder::decode (one byte at a time)"
        );
    }
    // The helpers the runtime uses produce the same bytes.
    let accept = file
        .valid
        .iter()
        .find(|c| c.message == "DATA_ACCEPT")
        .expect("a DATA_ACCEPT vector");
    assert_eq!(
        hex::encode(encode_accept()),
        accept.frame,
        "data::encode_accept"
    );
}

#[test]
fn invalid_frames() {
    let file: FramesFile = load("frames.json");
    assert!(
        !file.invalid.is_empty(),
        "frames.json has no invalid frames"
    );
    for c in &file.invalid {
        let n = &c.name;
        let frame = bytes(&c.frame, n);
        let (got, _) = decode_whole(&frame);
        match got {
            Err(e) => assert_eq!(wire_error_json(&e), c.error, "{n}: error (whole frame)"),
            Ok(m) => panic!("{n}: decoded as {m:?}, expected error {}", c.error),
        }
        match decode_bytewise(&frame) {
            Some((_, Err(e))) => {
                assert_eq!(wire_error_json(&e), c.error, "{n}: error (byte by byte)")
            }
            other => panic!(
                "{n}: byte by byte gave {other:?}, expected error {}",
                c.error
            ),
        }
    }
}

#[test]
fn frame_streams() {
    let file: FramesFile = load("frames.json");
    assert!(!file.streams.is_empty(), "frames.json has no streams");
    for s in &file.streams {
        let n = &s.name;
        let all = bytes(&s.bytes, n);
        let mut input = &all[..];
        let mut d = FrameDecoder::new();
        for (i, f) in s.frames.iter().enumerate() {
            let want = message(&f.message, &f.fields, n);
            assert_eq!(d.decode(&mut input), Ok(Some(want)), "{n}: frame {i}");
        }
        assert_eq!(
            hex::encode(input),
            s.rest,
            "{n}: bytes left after the frames"
        );
        assert_eq!(d.buffered(), 0, "{n}: decoder holds no partial frame");
    }
}

// ---------------------------------------------------------------------------------------------
// preamble.json
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct PreambleFile {
    encode: Vec<PreambleEncode>,
    parse: Vec<PreambleParse>,
    intake: Vec<IntakeCase>,
}

#[derive(Deserialize)]
struct PreambleEncode {
    kind: String,
    bytes: String,
}

#[derive(Deserialize)]
struct PreambleParse {
    name: String,
    bytes: String,
    result: String,
    #[serde(default)]
    error: Value,
}

#[derive(Deserialize)]
struct IntakeCase {
    name: String,
    tls: bool,
    bytes: String,
    result: String,
    #[serde(default)]
    hello: Value,
    #[serde(default)]
    rest: Option<String>,
    #[serde(default)]
    error: Value,
    #[serde(default)]
    code: Option<u16>,
}

fn kind(name: &str) -> ConnKind {
    match name {
        "control" => ConnKind::Control,
        "data" => ConnKind::Data,
        other => panic!("unknown connection kind {other:?} in the vectors"),
    }
}

#[test]
fn preamble_encoding() {
    let file: PreambleFile = load("preamble.json");
    assert!(!file.encode.is_empty(), "preamble.json has no encode cases");
    for c in &file.encode {
        assert_eq!(
            hex::encode(encode_preamble(kind(&c.kind))),
            c.bytes,
            "encode_preamble({})",
            c.kind
        );
    }
}

#[test]
fn preamble_parsing() {
    let file: PreambleFile = load("preamble.json");
    assert!(!file.parse.is_empty(), "preamble.json has no parse cases");
    for c in &file.parse {
        let n = &c.name;
        let got = parse_preamble(&bytes(&c.bytes, n));
        match c.result.as_str() {
            "need_more" => assert_eq!(got, Ok(None), "{n}"),
            "control" | "data" => assert_eq!(got, Ok(Some(kind(&c.result))), "{n}"),
            "error" => match got {
                Err(e) => assert_eq!(wire_error_json(&e), c.error, "{n}: error"),
                Ok(k) => panic!("{n}: parsed as {k:?}, expected error {}", c.error),
            },
            other => panic!("{n}: unknown result {other:?} in the vectors"),
        }
    }
}

fn intake_error_json(e: &IntakeError) -> Value {
    match e {
        IntakeError::Wire(w) => wire_error_json(w),
        IntakeError::ControlWithoutTls => json!({ "kind": "ControlWithoutTls" }),
        IntakeError::Unexpected(m) => json!({ "kind": "Unexpected", "value": m }),
    }
}

#[test]
fn connection_intake() {
    let file: PreambleFile = load("preamble.json");
    assert!(!file.intake.is_empty(), "preamble.json has no intake cases");
    for c in &file.intake {
        let n = &c.name;
        let all = bytes(&c.bytes, n);
        let mut input = &all[..];
        let got = Intake::new(c.tls).handle_input(&mut input);
        match c.result.as_str() {
            "need_more" => {
                assert_eq!(got, Ok(None), "{n}");
                assert!(
                    input.is_empty(),
                    "{n}: intake left bytes while it needs more"
                );
            }
            "control" => assert_eq!(got, Ok(Some(Classified::Control)), "{n}"),
            "data" => {
                let hello = data_hello(&c.hello, n);
                assert_eq!(got, Ok(Some(Classified::Data(hello.clone()))), "{n}");
                let opening = encode_data_hello(&hello);
                assert_eq!(
                    opening[..],
                    all[..opening.len()],
                    "{n}: data::encode_data_hello"
                );
            }
            "error" => match got {
                Err(e) => {
                    assert_eq!(intake_error_json(&e), c.error, "{n}: error");
                    assert_eq!(
                        e.code().map(ErrorCode::to_u16),
                        c.code,
                        "{n}: ERROR code sent back"
                    );
                }
                Ok(r) => panic!("{n}: classified as {r:?}, expected error {}", c.error),
            },
            other => panic!("{n}: unknown result {other:?} in the vectors"),
        }
        if let Some(rest) = &c.rest {
            assert_eq!(
                &hex::encode(input),
                rest,
                "{n}: bytes left for what follows"
            );
        }
    }
}
