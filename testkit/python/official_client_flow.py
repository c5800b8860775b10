"""Modal's official Python client (modal==1.6.4) through the spike's flow, against whatever
MODAL_SERVER_URL points at: the fake Modal, in controller/tests/modal_official_client.rs.

Every step asserts what the client saw. The last stdout line is a JSON object of what the Rust
side checks against the fake's record (ids, the pid of a background process). Run with the
environment that test sets (MODAL_SANDBOX_V2=0: tailbox, like the Go SDK, creates V1 sandboxes,
and the fake serves only those).
"""

import json
import sys
import time

import modal
import modal.exception

APP = "tailbox-official-client"
IMAGE = "ghcr.io/justinmoon/cook-sandbox:latest"


def step(name: str) -> None:
    print(f"official client: {name}", file=sys.stderr, flush=True)


def run(sb: modal.Sandbox, *argv: str, **kwargs) -> tuple[int, str, str]:
    p = sb.exec(*argv, **kwargs)
    out, err = p.stdout.read(), p.stderr.read()
    return p.wait(), out, err


def main() -> None:
    run_id = f"run-{time.time_ns()}"

    step("App.lookup")
    app = modal.App.lookup(APP, create_if_missing=True)
    assert app.app_id.startswith("ap-"), app.app_id

    step("Image.from_registry, Secret.from_dict, Sandbox.create")
    image = modal.Image.from_registry(IMAGE)
    secret = modal.Secret.from_dict({"FROM_SECRET": "secret-value"})
    sb = modal.Sandbox.create(
        app=app,
        image=image,
        timeout=600,
        env={"FROM_ENV": "env-value"},
        secrets=[secret],
        tags={"created-by": "official-client", "run": run_id},
    )
    assert sb.object_id.startswith("sb-"), sb.object_id
    assert sb.poll() is None, "a new sandbox is running"

    step("exec with stdin and stdout, as text")
    p = sb.exec("cat")
    p.stdin.write("hello through cat\n")
    p.stdin.write_eof()
    p.stdin.drain()
    assert p.stdout.read() == "hello through cat\n"
    assert p.wait() == 0

    step("exec with stdin and stdout, as bytes")
    payload = bytes(range(256)) * 4
    p = sb.exec("cat", text=False)
    p.stdin.write(payload)
    p.stdin.write_eof()
    p.stdin.drain()
    assert p.stdout.read() == payload
    assert p.wait() == 0

    step("stdout, stderr and an exit code")
    code, out, err = run(sb, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (code, out, err) == (3, "out\n", "err\n"), (code, out, err)

    step("environment: the sandbox's env and secret, the exec's env, the workdir")
    code, out, _ = run(
        sb, "sh", "-c", 'echo "$FROM_ENV $FROM_SECRET $FROM_EXEC $(pwd)"',
        env={"FROM_EXEC": "exec-value"}, workdir="/tmp",
    )
    assert (code, out) == (0, "env-value secret-value exec-value /tmp\n"), (code, out)

    step("filesystem: write_text and write_bytes (fs-tools WriteFile), seen by processes")
    sb.filesystem.write_text("written by the official client\n", "/tmp/official/hello.txt")
    big = bytes(i % 251 for i in range(600_000))  # several 256 KiB stream chunks
    sb.filesystem.write_bytes(big, "/tmp/official/big.bin")
    code, out, _ = run(sb, "cat", "/tmp/official/hello.txt")
    assert (code, out) == (0, "written by the official client\n"), (code, out)
    code, out, _ = run(sb, "sh", "-c", "wc -c < /tmp/official/big.bin")
    assert (code, out.strip()) == (0, str(len(big))), (code, out)
    assert sb.filesystem.read_bytes("/tmp/official/big.bin") == big
    assert sb.filesystem.read_text("/tmp/official/hello.txt") == "written by the official client\n"

    step("a process started by an exec outlives it")
    code, out, _ = run(sb, "sh", "-c", "sleep 600 </dev/null >/dev/null 2>&1 & echo $!")
    assert code == 0, code
    background_pid = int(out)
    code, _, _ = run(sb, "kill", "-0", str(background_pid))
    assert code == 0, "the background process is gone"

    step("stdout ends only when every holder has closed it")
    # "late" comes 3 s after the exec's own process exited: it is in the stream only if the
    # stream stayed open for the background child that held it.
    p = sb.exec("sh", "-c", "(sleep 3; echo late) & echo early")
    assert p.wait() == 0
    assert p.stdout.read() == "early\nlate\n"

    step("an exec killed by a signal")
    code, _, _ = run(sb, "sh", "-c", "kill -9 $$")
    assert code == 128 + 9, code

    step("Sandbox.list by tag")
    listed = [s.object_id for s in modal.Sandbox.list(app_id=app.app_id, tags={"run": run_id})]
    assert listed == [sb.object_id], listed

    step("terminate, then wait")
    sb.terminate()
    sb.wait(raise_on_termination=False)
    assert sb.returncode == 137, sb.returncode
    listed = [s.object_id for s in modal.Sandbox.list(app_id=app.app_id, tags={"run": run_id})]
    assert listed == [], listed
    try:
        sb.exec("true").wait()
        raise AssertionError("an exec in a terminated sandbox started")
    except (modal.exception.Error, modal.exception.SandboxTerminatedError):
        pass

    step("a sandbox whose entrypoint exits")
    done = modal.Sandbox.create("sh", "-c", "sleep 1; exit 7", app=app, image=image, timeout=60)
    done.wait(raise_on_termination=False)
    assert done.returncode == 7, done.returncode

    step("a sandbox that outlives its timeout")
    late = modal.Sandbox.create("sleep", "600", app=app, image=image, timeout=2)
    try:
        late.wait()
        raise AssertionError("wait returned for a sandbox past its timeout")
    except modal.exception.SandboxTimeoutError:
        pass
    assert late.returncode == 124, late.returncode

    print(json.dumps({
        "app_id": app.app_id,
        "sandbox_id": sb.object_id,
        "background_pid": background_pid,
        "exited_sandbox_id": done.object_id,
        "timed_out_sandbox_id": late.object_id,
    }))


if __name__ == "__main__":
    main()
