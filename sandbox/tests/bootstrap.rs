//! The bootstraps on the host, outside a container, where a test needs to hold a pipe still:
//! the Node bootstrap with its log pipe left unread a while answers the call once what the
//! function printed has left, however little of it was still queued.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use cloudfunc_images::runtime::NODE_BOOTSTRAP;
use cloudfunc_sandbox::Runtime;

use crate::common::Need;
use crate::Case;

pub fn cases() -> Vec<Case> {
    vec![Case::new(
        "bootstrap::node_answers_a_call_whose_last_lines_wait_behind_a_full_log_pipe",
        vec![Need::Runtime(Runtime::Node)],
        node_answers_behind_a_full_log_pipe,
    )]
}

fn frame(json: &str) -> Vec<u8> {
    let mut out = u32::try_from(json.len()).unwrap().to_be_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out
}

fn read_frame(from: &mut impl Read) -> Option<String> {
    let mut head = [0u8; 4];
    from.read_exact(&mut head).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(head) as usize];
    from.read_exact(&mut body).ok()?;
    Some(String::from_utf8(body).unwrap())
}

fn node_answers_behind_a_full_log_pipe() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bootstrap.js"), NODE_BOOTSTRAP).unwrap();
    // A pipe's worth of output, which fills the log pipe, then a few lines, which Node queues
    // (fewer bytes than its mark, so no 'drain' is ever sent for them).
    std::fs::write(
        dir.path().join("index.js"),
        "exports.handler = () => { process.stdout.write('x'.repeat(65536)); \
         for (let i = 0; i < 10; i++) console.log('line', i); return 'done'; };\n",
    )
    .unwrap();
    // As the image starts it: requests on fd 3, replies on fd 4, its output to the log pipe.
    let mut node = Command::new("sh")
        .arg("-c")
        .arg("exec node \"$0\" 3<&0 4>&1 </dev/null >&2")
        .arg(dir.path().join("bootstrap.js"))
        .env("CLOUDFUNC_CODE_DIR", dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut requests, mut replies) = (node.stdin.take().unwrap(), node.stdout.take().unwrap());
    let mut logs = node.stderr.take().unwrap();
    requests.write_all(&frame(r#"{"handler":null}"#)).unwrap();
    let ready = read_frame(&mut replies).expect("the bootstrap is ready");
    assert!(ready.contains(r#""ready":true"#), "{ready}");
    requests
        .write_all(&frame(r#"{"event":{},"context":{}}"#))
        .unwrap();
    // The log pipe unread a while: the function's output waits in it and in Node's queue.
    std::thread::sleep(Duration::from_millis(500));
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        logs.read_to_end(&mut text).unwrap();
        text
    });
    let reply = read_frame(&mut replies);
    drop(requests);
    let status = node.wait().unwrap();
    let printed = reader.join().unwrap();
    assert_eq!(
        reply.as_deref(),
        Some(r#"{"ok":true,"result":"done"}"#),
        "the bootstrap ended ({status}) without answering"
    );
    assert!(printed.ends_with(b"line 9\n"), "every line left first");
}
