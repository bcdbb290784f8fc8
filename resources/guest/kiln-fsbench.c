/*
 * kiln-fsbench: the file-system operations of tools/bench-fs, timed by
 * themselves (static, built by tools/build-rootfs into /bin/kiln-fsbench;
 * tools/bench-fs also builds it for the host, so the guest and host
 * columns run the same code).
 *
 *   kiln-fsbench run LABEL DIR MIB N [drop]
 *       In DIR, one after the other:
 *         write   DIR/w.dat: MIB MiB of pattern (seed 1) in 1 MiB write()s,
 *                 then fsync (timed together; fsync alone also printed);
 *         drop    only with "drop": sync, then "3" into
 *                 /proc/sys/vm/drop_caches (the guest's page cache);
 *         read    DIR/r.dat, written beforehand by the host (pattern seed
 *                 2), in 1 MiB read()s to EOF, every byte checked;
 *         create  N files DIR/f/NNNNN (O_CREAT|O_EXCL, 100 pattern bytes
 *                 each, close); DIR/f is made first and must not exist;
 *         stat    stat() of each;
 *         unlink  unlink() of each, then rmdir DIR/f.
 *       Prints "FSBENCH LABEL begin PHASE" before a phase and
 *       "FSBENCH LABEL PHASE AMOUNT SECONDS" after it (AMOUNT: bytes or
 *       files; SECONDS of CLOCK_MONOTONIC around the phase only), and
 *       "FSBENCH LABEL ok" at the end; on an error, "kiln-fsbench: ..." on
 *       stderr and exit status 1.
 *
 * Pattern byte i of seed s is (i * 31 + s) & 0xff, as in kiln-vsock.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (1 << 20)
#define SMALL 100
static unsigned char buf[CHUNK], want[CHUNK];
static const char *label;

static void die(const char *what, const char *arg) {
    fprintf(stderr, "kiln-fsbench: %s %s: %s\n", what, arg, strerror(errno));
    exit(1);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* A chunk's worth of pattern: CHUNK is a multiple of its period (256). */
static void pattern(unsigned char *p, size_t n, unsigned seed) {
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)(i * 31 + seed);
}

static void begin(const char *phase) {
    printf("FSBENCH %s begin %s\n", label, phase);
    fflush(stdout);
}

static void done(const char *phase, unsigned long long amount, double s) {
    printf("FSBENCH %s %s %llu %.6f\n", label, phase, amount, s);
    fflush(stdout);
}

static void write_all(int fd, const unsigned char *p, size_t n, const char *path) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            die("write", path);
        p += w;
        n -= (size_t)w;
    }
}

static void seq_write(const char *path, unsigned long long mib) {
    pattern(buf, CHUNK, 1);
    begin("write");
    double t0 = now();
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        die("open", path);
    for (unsigned long long i = 0; i < mib; i++)
        write_all(fd, buf, CHUNK, path);
    double t1 = now();
    if (fsync(fd) < 0)
        die("fsync", path);
    if (close(fd) < 0)
        die("close", path);
    double t2 = now();
    done("write", mib * CHUNK, t2 - t0);
    done("fsync", mib * CHUNK, t2 - t1);
}

static void drop_caches(void) {
    begin("drop");
    double t0 = now();
    sync();
    int fd = open("/proc/sys/vm/drop_caches", O_WRONLY);
    if (fd < 0)
        die("open", "/proc/sys/vm/drop_caches");
    write_all(fd, (const unsigned char *)"3\n", 2, "/proc/sys/vm/drop_caches");
    close(fd);
    done("drop", 0, now() - t0);
}

static void seq_read(const char *path) {
    pattern(want, CHUNK, 2);
    begin("read");
    double t0 = now();
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        die("open", path);
    unsigned long long total = 0;
    size_t fill = 0; /* bytes of the current chunk read so far */
    for (;;) {
        ssize_t r = read(fd, buf + fill, CHUNK - fill);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            die("read", path);
        if (r == 0)
            break;
        if (memcmp(buf + fill, want + fill, (size_t)r) != 0) {
            errno = EILSEQ;
            die("data differs from the pattern in", path);
        }
        fill = (fill + (size_t)r) % CHUNK;
        total += (unsigned long long)r;
    }
    close(fd);
    done("read", total, now() - t0);
}

static void small_files(const char *dir, long n) {
    char d[4096], path[4200];
    snprintf(d, sizeof d, "%s/f", dir);
    pattern(buf, SMALL, 3);
    begin("create");
    double t0 = now();
    if (mkdir(d, 0755) < 0)
        die("mkdir", d);
    for (long i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/%05ld", d, i);
        int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0644);
        if (fd < 0)
            die("create", path);
        write_all(fd, buf, SMALL, path);
        if (close(fd) < 0)
            die("close", path);
    }
    done("create", (unsigned long long)n, now() - t0);
    begin("stat");
    t0 = now();
    for (long i = 0; i < n; i++) {
        struct stat st;
        snprintf(path, sizeof path, "%s/%05ld", d, i);
        if (stat(path, &st) < 0)
            die("stat", path);
        if (st.st_size != SMALL) {
            errno = EIO;
            die("wrong size:", path);
        }
    }
    done("stat", (unsigned long long)n, now() - t0);
    begin("unlink");
    t0 = now();
    for (long i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/%05ld", d, i);
        if (unlink(path) < 0)
            die("unlink", path);
    }
    if (rmdir(d) < 0)
        die("rmdir", d);
    done("unlink", (unsigned long long)n, now() - t0);
}

int main(int argc, char **argv) {
    if (argc < 6 || argc > 7 || strcmp(argv[1], "run") != 0 ||
        (argc == 7 && strcmp(argv[6], "drop") != 0)) {
        fprintf(stderr, "usage: kiln-fsbench run LABEL DIR MIB N [drop]\n");
        return 2;
    }
    label = argv[2];
    const char *dir = argv[3];
    unsigned long long mib = strtoull(argv[4], NULL, 10);
    long n = strtol(argv[5], NULL, 10);
    char path[4200];
    snprintf(path, sizeof path, "%s/w.dat", dir);
    seq_write(path, mib);
    if (argc == 7)
        drop_caches();
    snprintf(path, sizeof path, "%s/r.dat", dir);
    seq_read(path);
    small_files(dir, n);
    printf("FSBENCH %s ok\n", label);
    return 0;
}
