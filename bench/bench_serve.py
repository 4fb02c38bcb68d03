"""`ragseek serve` under abuse: the probes of issue 14 §5 against a real server process on 127.0.0.1.

    .venv/bin/python bench/bench_serve.py                    # SmolLM2-135M-Instruct (local:base), default limits
    .venv/bin/python bench/bench_serve.py --llm local        # with the reader adapter

Starts `ragseek serve --llm SPEC` with its default limits (1 MiB body, 100,000 prompt characters, 32 waiting) and a
key in $RAGSEEK_API_KEY, then: 50 MB bodies (announced, and streamed chunked), a 150k-character prompt, clients that
hang up mid-generation (whole and streamed), a wrong key, and 200 clients at once. Each row is what the server
answered, how fast, and what it cost it (resident memory, CPU seconds, read from /proc). Writes
bench/results/serve.json and bench/results/serve.md; the server's log goes to runs/bench/serve.log.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
KEY = "sk-bench"
HOST = "127.0.0.1"


class Server:
    """`ragseek serve` as a child process: its port, its resident memory and CPU seconds."""

    def __init__(self, llm: str, log: Path):
        with socket.socket() as s:
            s.bind((HOST, 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "RAGSEEK_API_KEY": KEY, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, "-m", "ragseek", "serve", "--llm", llm, "--port", str(self.port)]
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(
            [*cmd, "--served-model-name", "m"], stdout=self.log, stderr=subprocess.STDOUT, env=env
        )
        while True:
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise SystemExit(f"ragseek serve did not start; see {log}") from None
                time.sleep(0.2)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def alive(self) -> bool:
        return self.proc.poll() is None and request(self, "/v1/models", None, "GET")[0] == 200

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()
        self.log.close()


def request(server: Server, path: str, body: dict | None, method: str = "POST", key: str | None = KEY):
    """(status, parsed body, headers)."""
    conn = http.client.HTTPConnection(HOST, server.port, timeout=300)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    conn.request(method, path, None if body is None else json.dumps(body), headers)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp.status, json.loads(raw) if raw.startswith(b"{") else raw.decode(), resp.headers


def big_body(server: Server, size: int, chunked: bool) -> tuple[int, int]:
    """(status, bytes sent) of a `size`-byte POST: announced by Content-Length and never sent, or sent chunked in
    64 KiB pieces until the server answers."""
    conn = http.client.HTTPConnection(HOST, server.port, timeout=60)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Authorization", f"Bearer {KEY}")
    conn.putheader("Content-Type", "application/json")
    sent = 0
    if not chunked:
        conn.putheader("Content-Length", str(size))
        conn.endheaders()
    else:
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        piece = b"x" * 65536
        while sent < size:
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
            conn.sock.settimeout(0)
            try:
                if conn.sock.recv(1, socket.MSG_PEEK):
                    break
            except BlockingIOError:
                pass
            finally:
                conn.sock.settimeout(60)
    status = conn.getresponse().status
    conn.close()
    return status, sent


def hang_up(server: Server, stream: bool, after_s: float = 2.0, watch_s: float = 5.0) -> dict:
    """Ask for 256 tokens, hang up after `after_s`; the server's CPU seconds per second before and after."""
    conn = http.client.HTTPConnection(HOST, server.port, timeout=60)
    body = {"model": "m", "prompt": "Once upon a time", "max_tokens": 256, "temperature": 0, "stream": stream}
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    conn.request("POST", "/v1/completions", json.dumps(body), headers)
    time.sleep(0.5)
    c0 = server.cpu_s()
    time.sleep(after_s - 0.5)
    c1 = server.cpu_s()
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    time.sleep(0.5)  # the forward pass under way ends
    c2 = server.cpu_s()
    time.sleep(watch_s)
    return {
        "cpu_per_s_generating": (c1 - c0) / (after_s - 0.5),
        "cpu_per_s_after": (server.cpu_s() - c2) / watch_s,
    }


def crowd(server: Server, n: int = 200) -> dict:
    """n clients at once: 3/4 chats (16 tokens, a fifth streamed), the rest abusive."""
    chat = {"model": "m", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 16}
    kinds = {
        "chat": lambda: request(server, "/v1/chat/completions", chat)[0],
        "stream": lambda: request(server, "/v1/chat/completions", {**chat, "stream": True})[0],
        "50 MB announced": lambda: big_body(server, 50 << 20, False)[0],
        "50 MB chunked": lambda: big_body(server, 50 << 20, True)[0],
        "150k-char prompt": lambda: request(server, "/v1/completions", {**chat, "prompt": "x" * 150_000})[0],
        "no key": lambda: request(server, "/v1/chat/completions", chat, key=None)[0],
    }
    plan = ["chat"] * (n * 3 // 5) + ["stream"] * (n * 3 // 20)
    plan += [k for k in kinds if k not in ("chat", "stream")] * ((n - len(plan)) // 4 + 1)
    plan = plan[:n]
    start, done, peak = threading.Barrier(n), threading.Event(), [server.rss_mb()]
    before = peak[0]

    def client(kind: str) -> tuple[str, int, float]:
        start.wait()
        t0 = time.perf_counter()
        return kind, kinds[kind](), time.perf_counter() - t0

    def watch() -> None:
        while not done.is_set():
            peak.append(server.rss_mb())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        got = list(pool.map(client, plan))
    wall = time.perf_counter() - t0
    done.set()
    watcher.join()
    statuses = collections.Counter((k, s) for k, s, _ in got)
    ok = sorted(t for k, s, t in got if s == 200)
    return {
        "clients": n,
        "statuses": {f"{k} {s}": c for (k, s), c in sorted(statuses.items())},
        "other_5xx": sum(c for (_, s), c in statuses.items() if s >= 500 and s != 503),
        "wall_s": wall,
        "answered_p50_s": ok[len(ok) // 2] if ok else None,
        "rss_before_mb": before,
        "rss_peak_mb": max(peak),
        "rss_after_mb": server.rss_mb(),
        "alive_after": server.alive(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llm", default="local:base")
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = ROOT / "runs" / "bench" / "serve.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    server = Server(args.llm, log)
    out: dict = {"llm": args.llm}
    try:
        request(server, "/v1/completions", {"model": "m", "prompt": "Hi", "max_tokens": 4})  # warm up
        for name, chunked in (("body_50mb_announced", False), ("body_50mb_chunked", True)):
            before, t0 = server.rss_mb(), time.perf_counter()
            status, sent = big_body(server, 50 << 20, chunked)
            out[name] = {
                "status": status,
                "ms": 1000 * (time.perf_counter() - t0),
                "mb_sent": sent / 2**20,
                "rss_growth_mb": server.rss_mb() - before,
            }
        t0 = time.perf_counter()
        status, body, _ = request(server, "/v1/completions", {"model": "m", "prompt": "x" * 150_000})
        out["prompt_150k"] = {
            "status": status,
            "ms": 1000 * (time.perf_counter() - t0),
            "message": body["error"]["message"],
        }
        out["auth"] = {
            "no key": request(server, "/v1/models", None, "GET", key=None)[0],
            "wrong key": request(server, "/v1/models", None, "GET", key="sk-wrong")[0],
            "right key": request(server, "/v1/models", None, "GET")[0],
        }
        out["hang_up_whole"] = hang_up(server, stream=False)
        out["hang_up_streamed"] = hang_up(server, stream=True)
        out["crowd"] = crowd(server)
    finally:
        server.stop()
    (RESULTS / "serve.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / "serve.md").write_text(markdown(out))
    print(markdown(out))


def markdown(r: dict) -> str:
    b1, b2, p, c = r["body_50mb_announced"], r["body_50mb_chunked"], r["prompt_150k"], r["crowd"]
    hw, hs = r["hang_up_whole"], r["hang_up_streamed"]
    counts = ", ".join(f"{k}: {v}" for k, v in c["statuses"].items())
    rows = [
        (
            "50 MB body, Content-Length announced",
            f"{b1['status']} in {b1['ms']:.0f} ms, body unread; RSS +{b1['rss_growth_mb']:.0f} MB",
        ),
        (
            "50 MB body, chunked (no length)",
            f"{b2['status']} once 1 MiB had arrived (the client had sent {b2['mb_sent']:.1f} MB into the socket "
            f"buffers); RSS +{b2['rss_growth_mb']:.0f} MB",
        ),
        ("150,000-character prompt", f'{p["status"]} in {p["ms"]:.0f} ms: "{p["message"]}"'),
        ("no key / wrong key / right key", " / ".join(str(s) for s in r["auth"].values())),
        (
            "client hangs up mid-generation (whole answer)",
            f"server CPU {hw['cpu_per_s_generating']:.2f} s/s while generating, {hw['cpu_per_s_after']:.2f} s/s after",
        ),
        (
            "client hangs up mid-stream",
            f"server CPU {hs['cpu_per_s_generating']:.2f} s/s while generating, {hs['cpu_per_s_after']:.2f} s/s after",
        ),
        (
            f"{c['clients']} clients at once",
            f"{counts}; other 5xx: {c['other_5xx']}; all done in {c['wall_s']:.1f} s (answered p50 "
            f"{c['answered_p50_s']:.1f} s); RSS {c['rss_before_mb']:.0f} MB -> peak {c['rss_peak_mb']:.0f} MB -> "
            f"{c['rss_after_mb']:.0f} MB; alive after: {c['alive_after']}",
        ),
    ]
    table = "\n".join(f"| {a} | {b} |" for a, b in rows)
    return (
        "## Reliability: `ragseek serve` under abuse\n\n"
        f"`.venv/bin/python bench/bench_serve.py` — `ragseek serve --llm {r['llm']}` as its own process on 127.0.0.1, "
        "default limits (body 1 MiB, prompt 100,000 characters, 32 waiting), key from $RAGSEEK_API_KEY.\n\n"
        "| probe | result |\n| --- | --- |\n" + table + "\n"
    )


if __name__ == "__main__":
    main()
