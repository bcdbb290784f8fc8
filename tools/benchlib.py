"""Shared helpers for tools/bench-boot and tools/bench-blk (stdlib only).

run_vm() starts a VMM, timestamps every console line from process start,
samples /proc/PID/smaps for the VMM's memory overhead, and ends the VMM on a
timeout or an emulation failure instead of hanging.
"""

import base64
import os
import re
import signal
import statistics
import subprocess
import threading
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kiln")
MARKER = b"KILN-BOOT-OK"
EXIT_RE = re.compile(rb"KILN-EXIT=(\d+)")
# Base kernel command line (resources/examples/vm.json); kiln appends its
# kvm_pvm options to it on this host.
BASE_CMDLINE = "console=ttyS0 reboot=k panic=1 i8042.noaux quiet"


def log(msg):
    print(msg, flush=True)


def kiln_cmd_arg(cmd):
    return "kiln.cmd=" + base64.b64encode(cmd.encode()).decode()


def build_kiln():
    env = dict(os.environ)
    env.setdefault("CARGO_TARGET_DIR", os.path.join(REPO_ROOT, "target"))
    log("building kiln (cargo build --release, CARGO_TARGET_DIR=%s)" % env["CARGO_TARGET_DIR"])
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=REPO_ROOT, env=env, check=True)
    # .cargo/config.toml names the target (static binaries): artifacts
    # land under target/<triple>/.
    return os.path.join(env["CARGO_TARGET_DIR"], "x86_64-unknown-linux-gnu", "release", "kiln")


def guest_artifact(name):
    path = os.path.realpath(os.path.join(CACHE, name))
    if not os.path.exists(path):
        raise SystemExit("missing %s: run tools/quickstart --no-boot first" % path)
    return path


_HDR = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) (\S+) (\S+) (\d+)\s*(.*)$")


def smaps_sample(pid, mem_kib):
    """(total Rss KiB, guest-memory Rss KiB) of pid, or None if it is gone.

    The guest memory is the private anonymous mapping of mem_size (the one
    whose size is closest to mem_size, at least mem_size and at most 4 MiB
    more, for VMMs that round it up); its Rss is what the guest touched.
    """
    try:
        with open("/proc/%d/smaps" % pid) as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    total = 0
    best = None  # (size distance, rss)
    cur = None
    for line in text.splitlines():
        m = _HDR.match(line)
        if m:
            start, end = int(m.group(1), 16), int(m.group(2), 16)
            name = m.group(7).strip()
            anon = m.group(6) == "0" and (name == "" or name.startswith("[anon"))
            cur = {"size": (end - start) // 1024, "anon": anon}
            continue
        if line.startswith("Rss:") and cur is not None:
            rss = int(line.split()[1])
            total += rss
            size = cur["size"]
            if cur["anon"] and mem_kib <= size <= mem_kib + 4096:
                cand = (size - mem_kib, -rss)
                if best is None or cand < best:
                    best = cand
    if total == 0:
        return None
    return total, (-best[1] if best else 0)


_TICK = os.sysconf("SC_CLK_TCK")


def _per_thread(pid, read):
    """{thread name: sum of read(tid dir) over the threads of that name}
    for pid's threads (a thread that ends meanwhile, or that read cannot
    measure, counts nothing), or None if pid is gone."""
    out = {}
    task = "/proc/%d/task" % pid
    try:
        tids = os.listdir(task)
    except OSError:
        return None
    for tid in tids:
        try:
            name, secs = read("%s/%s" % (task, tid))
        except (OSError, IndexError, AttributeError, ValueError):
            continue
        out[name] = out.get(name, 0.0) + secs
    return out


def _stat_secs(tdir):
    """(name, user + system CPU seconds) from a thread's stat (10 ms ticks)."""
    with open(tdir + "/stat") as f:
        st = f.read()
    fields = st[st.rindex(")") + 2:].split()
    return st[st.index("(") + 1:st.rindex(")")], (int(fields[11]) + int(fields[12])) / _TICK


def _sched_secs(tdir):
    """(name, CPU seconds) from a thread's sched file's se.sum_exec_runtime (ms)."""
    with open(tdir + "/sched") as f:
        name, text = f.readline().rsplit(" (", 1)[0], f.read()
    m = re.search(r"se\.sum_exec_runtime\s*:\s*([\d.]+)", text)
    return name, float(m.group(1)) / 1000


def thread_cpu(pid):
    """{thread name: CPU seconds (user + system)} of pid's threads, or None."""
    return _per_thread(pid, _stat_secs)


def sched_cpu(pid):
    """{thread name: CPU seconds} of pid's threads from se.sum_exec_runtime
    in /proc/PID/task/TID/sched (ns; CONFIG_SCHED_DEBUG), else thread_cpu's
    10 ms ticks; None if pid is gone."""
    cpu = _per_thread(pid, _sched_secs)
    return cpu or thread_cpu(pid)


def cpu_between(res, ta, tb):
    """Per-thread CPU seconds used between host times ta and tb (samples nearest)."""
    samples = res["cpu_samples"]
    if not samples:
        return {}
    a = min(samples, key=lambda s: abs(s[0] - ta))[1]
    b = min(samples, key=lambda s: abs(s[0] - tb))[1]
    return {k: b[k] - a.get(k, 0.0) for k in b}


def run_vm(argv, mem_mib, timeout, post_marker_timeout=60.0, cwd=None, echo=False,
           stop_on=(rb"^Code=",), need_exit=True):
    """Run one VM to completion (or timeout). Returns a dict:
    t_marker (s since start or None), t_exit_line, exit_status (KILN-EXIT),
    t_end (when the VMM closed its stdout: its exit),
    rc, peak_overhead_kib, peak_total_kib, guest_kib, lines, stderr, failure."""
    mem_kib = mem_mib * 1024
    lines = []  # (t, bytes)
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=cwd, start_new_session=True)
    stderr_chunks = []
    state = {"marker": None, "exit_line": None, "exit_status": None, "stop": None, "end": None}
    stop_res = [re.compile(p) for p in stop_on]

    def read_out():
        for raw in iter(proc.stdout.readline, b""):
            t = time.monotonic() - t0
            line = raw.rstrip(b"\r\n")
            lines.append((t, line))
            if echo:
                print("  %7.2f | %s" % (t, line.decode(errors="replace")), flush=True)
            if state["marker"] is None and MARKER in line:
                state["marker"] = t
            m = EXIT_RE.search(line)
            if m and state["exit_line"] is None:
                state["exit_line"] = t
                state["exit_status"] = int(m.group(1))
            if state["stop"] is None and any(r.search(line) for r in stop_res):
                state["stop"] = line.decode(errors="replace")
        state["end"] = time.monotonic() - t0

    def read_err():
        for chunk in iter(lambda: proc.stderr.read(4096), b""):
            stderr_chunks.append(chunk)

    threads = [threading.Thread(target=read_out, daemon=True),
               threading.Thread(target=read_err, daemon=True)]
    for th in threads:
        th.start()

    peak_over = 0
    peak_total = 0
    guest_at_peak = 0
    failure = None
    cpu_samples = []  # (t, {thread: cpu s})
    while True:
        c = thread_cpu(proc.pid)
        if c:
            cpu_samples.append((time.monotonic() - t0, c))
        s = smaps_sample(proc.pid, mem_kib)
        if s is not None:
            total, guest = s
            if total - guest > peak_over:
                peak_over, guest_at_peak = total - guest, guest
            peak_total = max(peak_total, total)
        if proc.poll() is not None:
            break
        now = time.monotonic() - t0
        if state["stop"] is not None:
            failure = "guest failed (%s)" % state["stop"][:80]
            break
        if state["marker"] is None and now > timeout:
            failure = "no %s within %.0f s" % (MARKER.decode(), timeout)
            break
        if state["marker"] is not None:
            if not need_exit:
                break
            if now > state["marker"] + post_marker_timeout:
                failure = "VMM still running %.0f s after %s" % (post_marker_timeout, MARKER.decode())
                break
        time.sleep(0.2)
    if proc.poll() is None:
        # Give a failing QEMU time to print the register dump, then end it.
        time.sleep(0.5 if failure else 0)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    rc = proc.wait()
    for th in threads:
        th.join(timeout=5)
    if failure is None:
        if state["marker"] is None:
            failure = "VMM exited (rc %d) before %s" % (rc, MARKER.decode())
        elif need_exit and state["exit_status"] is None:
            failure = "no KILN-EXIT line (rc %d)" % rc
        elif need_exit and state["exit_status"] != 0:
            failure = "guest command failed: KILN-EXIT=%d" % state["exit_status"]
        elif need_exit and rc != 0:
            failure = "VMM rc %d" % rc
    return {
        "t_marker": state["marker"], "t_exit_line": state["exit_line"], "t_end": state["end"],
        "exit_status": state["exit_status"], "rc": rc,
        "peak_overhead_kib": peak_over, "peak_total_kib": peak_total,
        "guest_kib": guest_at_peak, "lines": lines, "cpu_samples": cpu_samples,
        "stderr": b"".join(stderr_chunks).decode(errors="replace"), "failure": failure,
    }


def min_med(xs):
    return (min(xs), statistics.median(xs)) if xs else (None, None)


def fmt(x, spec="%.2f"):
    return "-" if x is None else spec % x


def qemu_argv(kernel, initrd, cmdline, mem_mib, smp=1, extra=()):
    """QEMU microvm as in tools/qemu-boot-guest (flags that work on this host)."""
    argv = ["qemu-system-x86_64",
            "-M", "microvm,x-option-roms=off,pit=off,pic=off,rtc=off,isa-serial=on,acpi=off",
            "-device", "i8042", "-enable-kvm", "-cpu", "host,-arch-capabilities",
            "-m", str(mem_mib), "-smp", str(smp),
            "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
            "-kernel", kernel, "-append", cmdline]
    if initrd:
        argv += ["-initrd", initrd]
    return argv + list(extra)


def tail(res, n=15):
    out = [l.decode(errors="replace") for _, l in res["lines"][-n:]]
    err = res["stderr"].strip().splitlines()[-n:]
    return "\n".join(["    console: " + l for l in out] + ["    stderr:  " + l for l in err])
