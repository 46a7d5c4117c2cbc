"""How fast can this machine take a sha256 of a file it just wrote? (issue 12, the write target)

Times, on one file of --mb MiB in the page cache: hashlib.sha256 over memory in chunks of
several sizes, and the read-back paths (pread into fresh bytes, preadv into one reused buffer,
mmap), so the hashing writer's read-back can be chosen by measurement.
"""
import argparse, hashlib, json, mmap, os, platform, time


def timed(fn, runs=3):
    best = None
    for _ in range(runs):
        t = time.perf_counter(); out = fn(); dt = time.perf_counter() - t
        best = dt if best is None or dt < best else best
    return best, out


def concurrent(view, path):
    """Write ``view`` unbuffered in 64 MiB pieces plus fsync while another thread hashes it:
    read back by preadv, read back through mmap, or from the writer's memory."""
    import threading
    n, out = len(view), {}
    for how in ("none", "preadv", "mmap", "memory"):
        times = []
        for _ in range(3):
            done = [0]
            cond = threading.Condition()
            finished = [False]
            def hasher(fd):
                h, o, buf = hashlib.sha256(), 0, memoryview(bytearray(1 << 20))
                while True:
                    with cond:
                        while done[0] - o < (16 << 20) and not finished[0]:
                            cond.wait()
                        target, last = done[0], finished[0]
                    if how == "mmap" and target > o:
                        start = o - o % mmap.ALLOCATIONGRANULARITY
                        with mmap.mmap(fd, target - start, offset=start, prot=mmap.PROT_READ) as m:
                            mv = memoryview(m)
                            for p in range(o - start, target - start, 1 << 20):
                                h.update(mv[p:min(p + (1 << 20), target - start)])
                            mv.release()
                        o = target
                    while o < target:
                        if how == "preadv":
                            k = os.preadv(fd, [buf[:min(1 << 20, target - o)]], o); h.update(buf[:k])
                        else:
                            k = min(1 << 20, target - o); h.update(view[o:o + k])
                        o += k
                    if last:
                        return
            t = time.perf_counter()
            with open(path, "wb", buffering=0) as f:
                rfd = os.open(path, os.O_RDONLY)
                th = threading.Thread(target=hasher, args=(rfd,)) if how != "none" else None
                th and th.start()
                o = 0
                while o < n:
                    o += f.write(view[o:o + (64 << 20)])
                    with cond:
                        done[0] = o; cond.notify()
                os.fsync(f.fileno())
                with cond:
                    finished[0] = True; cond.notify()
                th and th.join()
                os.close(rfd)
            times.append(time.perf_counter() - t)
            os.unlink(path)
        out[f"write_with_hash_{how}_s"] = round(sorted(times)[1], 3)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=768)
    ap.add_argument("--path", default="/tmp/bench_hash.bin")
    a = ap.parse_args()
    data = os.urandom(1 << 20) * a.mb
    n = len(data)
    with open(a.path, "wb") as f:
        f.write(data); f.flush(); os.fsync(f.fileno())
    res = {"bytes": n, "cpu": platform.processor() or "", "openssl": __import__("ssl").OPENSSL_VERSION}
    try:
        flags = open("/proc/cpuinfo").read()
        res["sha_ni"] = " sha_ni " in flags
        res["model"] = next(l.split(":", 1)[1].strip() for l in flags.splitlines() if l.startswith("model name"))
    except Exception:
        pass
    view = memoryview(data)
    for chunk_mib in (0.25, 1, 4, 16):
        c = int(chunk_mib * (1 << 20))
        def mem():
            h = hashlib.sha256()
            for o in range(0, n, c):
                h.update(view[o:o + c])
            return h.hexdigest()
        s, d = timed(mem)
        res[f"memory_{chunk_mib}MiB_GBps"] = round(n / s / 1e9, 3)
    fd = os.open(a.path, os.O_RDONLY)
    for chunk_mib in (1, 16):
        c = chunk_mib << 20
        def fresh():
            h = hashlib.sha256(); o = 0
            while o < n:
                b = os.pread(fd, c, o); h.update(b); o += len(b)
            return h.hexdigest()
        s, _ = timed(fresh)
        res[f"pread_fresh_{chunk_mib}MiB_GBps"] = round(n / s / 1e9, 3)
        buf = bytearray(c); bv = memoryview(buf)
        def reused():
            h = hashlib.sha256(); o = 0
            while o < n:
                k = os.preadv(fd, [bv], o); h.update(bv[:k]); o += k
            return h.hexdigest()
        s, _ = timed(reused)
        res[f"preadv_reused_{chunk_mib}MiB_GBps"] = round(n / s / 1e9, 3)
    def mapped():
        h = hashlib.sha256()
        with mmap.mmap(fd, n, prot=mmap.PROT_READ) as m:
            mv = memoryview(m)
            for o in range(0, n, 1 << 20):
                h.update(mv[o:o + (1 << 20)])
            mv.release()
        return h.hexdigest()
    s, _ = timed(mapped)
    res["mmap_1MiB_GBps"] = round(n / s / 1e9, 3)
    def plain_write():
        with open(a.path + ".w", "wb", buffering=0) as f:
            o = 0
            while o < n:
                o += f.write(view[o:o + (64 << 20)])
            os.fsync(f.fileno())
    s, _ = timed(plain_write)
    res["plain_write_fsync_GBps"] = round(n / s / 1e9, 3)
    os.close(fd)
    res.update(concurrent(view, a.path + ".c"))
    os.unlink(a.path); os.unlink(a.path + ".w")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
