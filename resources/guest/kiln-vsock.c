/*
 * kiln-vsock: the guest side of kiln's vsock tests and benchmark (static,
 * built by tools/build-rootfs into /bin/kiln-vsock).
 *
 *   kiln-vsock serve PORT [COUNT]
 *       Listens on vsock PORT and serves COUNT connections (default:
 *       forever), one at a time. Each starts with a command line:
 *         ECHO\n             every byte read is written back, until EOF
 *         SINK\n             reads until EOF, answers "<bytes> <fnv1a64>\n"
 *         SOURCE <n> <seed>\n  writes n pattern bytes, then closes
 *       Prints "LISTENING <port>" once listening.
 *   kiln-vsock connect PORT echo SIZE
 *       Connects to the host (CID 2) at PORT, sends SIZE pattern bytes while
 *       reading them back, checks they match, prints "ECHO-OK <bytes>".
 *   kiln-vsock connect PORT send SIZE SEED
 *       Connects to the host, writes SIZE pattern bytes, shuts down its
 *       write side, prints the host's one-line answer ("REPLY <line>").
 *   kiln-vsock connect PORT probe
 *       Connects and prints "CONNECT-OK" or "CONNECT-ERR=<errno name>".
 *
 *
 * TCP, for the network tests and benchmark (tests/net.rs, tools/bench-net),
 * with 1 MiB reads and writes: each guest system call is costly where the
 * guest kernel is interpreted, so few large ones move the most:
 *   kiln-vsock tcp pipe SRC-IP SRC-PORT DST-IP DST-PORT
 *       Connects to both, copies everything from the first to the second,
 *       shuts the second's write side, prints "PIPED <bytes> <ms>".
 *   kiln-vsock tcp send IP PORT SIZE SEED
 *       Connects, writes SIZE pattern bytes, shuts down its write side,
 *       prints "SENT <bytes> <ms>" and the peer's one-line answer, if any,
 *       as "REPLY <line>".
 *   kiln-vsock tcp recv IP PORT
 *       Connects, reads until EOF, prints "RECEIVED <bytes> <fnv1a64> <ms>".
 *
 * The pattern byte i of seed s is (i * 31 + s) & 0xff, the same on the
 * host side (tests/vsock.rs, tools/bench-vsock, tools/bench-net).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <linux/vm_sockets.h>

#define BUF (64 * 1024)
static unsigned char buf[BUF], buf2[BUF];
#define TCP_BUF (1024 * 1024)
static unsigned char tcp_buf[TCP_BUF];

static void die(const char *what) {
    fprintf(stderr, "kiln-vsock: %s: %s\n", what, strerror(errno));
    exit(1);
}

static uint64_t fnv1a(uint64_t h, const unsigned char *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

static void pattern(unsigned char *p, size_t n, uint64_t offset, unsigned seed) {
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)((offset + i) * 31 + seed);
}

static void write_all(int fd, const unsigned char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            die("write");
        }
        p += w;
        n -= (size_t)w;
    }
}

/* Reads fd to EOF into b (cap bytes at a time): the FNV-1a of it, its size
 * in *total. */
static uint64_t sink(int fd, unsigned char *b, size_t cap, uint64_t *total) {
    uint64_t h = 0xcbf29ce484222325ULL;
    ssize_t r;
    *total = 0;
    while ((r = read(fd, b, cap)) > 0) {
        h = fnv1a(h, b, (size_t)r);
        *total += (uint64_t)r;
    }
    if (r < 0)
        die("read");
    return h;
}

/* Writes size pattern bytes of seed to fd from b (cap bytes at a time). */
static void source(int fd, uint64_t size, unsigned seed, unsigned char *b, size_t cap) {
    for (uint64_t off = 0; off < size;) {
        size_t k = size - off < cap ? (size_t)(size - off) : cap;
        pattern(b, k, off, seed);
        write_all(fd, b, k);
        off += k;
    }
}

/* Reads one line (without the newline) a byte at a time. */
static int read_line(int fd, char *line, size_t max) {
    size_t n = 0;
    while (n + 1 < max) {
        char c;
        ssize_t r = read(fd, &c, 1);
        if (r <= 0)
            return -1;
        if (c == '\n')
            break;
        line[n++] = c;
    }
    line[n] = 0;
    return 0;
}

static void serve_one(int c) {
    char line[64];
    if (read_line(c, line, sizeof line) < 0)
        return;
    if (strcmp(line, "ECHO") == 0) {
        ssize_t r;
        while ((r = read(c, buf, BUF)) > 0)
            write_all(c, buf, (size_t)r);
    } else if (strcmp(line, "SINK") == 0) {
        uint64_t total, h = sink(c, buf, BUF, &total);
        int n = snprintf(line, sizeof line, "%llu %016llx\n",
                         (unsigned long long)total, (unsigned long long)h);
        write_all(c, (unsigned char *)line, (size_t)n);
    } else {
        unsigned long long n;
        unsigned seed;
        if (sscanf(line, "SOURCE %llu %u", &n, &seed) != 2)
            return;
        source(c, n, seed, buf, BUF);
    }
}

static int serve(unsigned port, long count) {
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0)
        die("socket");
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_port = port, .svm_cid = VMADDR_CID_ANY};
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0)
        die("bind");
    if (listen(s, 8) < 0)
        die("listen");
    printf("LISTENING %u\n", port);
    fflush(stdout);
    for (long i = 0; count < 0 || i < count; i++) {
        int c = accept(s, NULL, NULL);
        if (c < 0)
            die("accept");
        serve_one(c);
        close(c);
    }
    return 0;
}

static int connect_host(unsigned port) {
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0)
        die("socket");
    struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_port = port, .svm_cid = VMADDR_CID_HOST};
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0)
        return -errno;
    return s;
}

static int echo(int s, uint64_t size) {
    uint64_t sent = 0, got = 0;
    while (got < size) {
        if (sent < size) {
            size_t k = size - sent < BUF ? (size_t)(size - sent) : BUF;
            pattern(buf, k, sent, 7);
            write_all(s, buf, k);
            sent += k;
        }
        while (got < sent) {
            ssize_t r = read(s, buf2, (size_t)(sent - got) < BUF ? (size_t)(sent - got) : BUF);
            if (r <= 0)
                die("read echo");
            pattern(buf, (size_t)r, got, 7);
            if (memcmp(buf, buf2, (size_t)r) != 0) {
                printf("ECHO-MISMATCH at %llu\n", (unsigned long long)got);
                return 1;
            }
            got += (uint64_t)r;
        }
    }
    printf("ECHO-OK %llu\n", (unsigned long long)got);
    return 0;
}

static int send_data(int s, uint64_t size, unsigned seed) {
    source(s, size, seed, buf, BUF);
    if (shutdown(s, SHUT_WR) < 0)
        die("shutdown");
    char line[64];
    if (read_line(s, line, sizeof line) < 0)
        die("read reply");
    printf("REPLY %s\n", line);
    return 0;
}

static long long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static int tcp_connect(const char *ip, const char *port) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)strtoul(port, NULL, 10))};
    if (inet_pton(AF_INET, ip, &a.sin_addr) != 1) {
        fprintf(stderr, "kiln-vsock: not an IPv4 address: %s\n", ip);
        exit(2);
    }
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0)
        die("socket");
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0)
        die("connect");
    return s;
}

static int tcp(int argc, char **argv) {
    long long start = now_ms();
    if (argc == 7 && strcmp(argv[2], "pipe") == 0) {
        int src = tcp_connect(argv[3], argv[4]), dst = tcp_connect(argv[5], argv[6]);
        unsigned long long total = 0;
        ssize_t r;
        while ((r = read(src, tcp_buf, TCP_BUF)) > 0) {
            write_all(dst, tcp_buf, (size_t)r);
            total += (unsigned long long)r;
        }
        if (r < 0)
            die("read");
        if (shutdown(dst, SHUT_WR) < 0)
            die("shutdown");
        printf("PIPED %llu %lld\n", total, now_ms() - start);
        return 0;
    }
    if (argc == 7 && strcmp(argv[2], "send") == 0) {
        int s = tcp_connect(argv[3], argv[4]);
        uint64_t size = strtoull(argv[5], NULL, 10);
        source(s, size, (unsigned)strtoul(argv[6], NULL, 10), tcp_buf, TCP_BUF);
        if (shutdown(s, SHUT_WR) < 0)
            die("shutdown");
        printf("SENT %llu %lld\n", (unsigned long long)size, now_ms() - start);
        char line[128];
        if (read_line(s, line, sizeof line) == 0)
            printf("REPLY %s\n", line);
        return 0;
    }
    if (argc == 5 && strcmp(argv[2], "recv") == 0) {
        int s = tcp_connect(argv[3], argv[4]);
        uint64_t total, h = sink(s, tcp_buf, TCP_BUF, &total);
        printf("RECEIVED %llu %016llx %lld\n", (unsigned long long)total, (unsigned long long)h,
               now_ms() - start);
        return 0;
    }
    fprintf(stderr, "usage: kiln-vsock tcp pipe SRC-IP SRC-PORT DST-IP DST-PORT | "
                    "tcp send IP PORT SIZE SEED | tcp recv IP PORT\n");
    return 2;
}

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "tcp") == 0)
        return tcp(argc, argv);
    if (argc >= 3 && strcmp(argv[1], "serve") == 0)
        return serve((unsigned)strtoul(argv[2], NULL, 10), argc > 3 ? strtol(argv[3], NULL, 10) : -1);
    if (argc >= 4 && strcmp(argv[1], "connect") == 0) {
        unsigned port = (unsigned)strtoul(argv[2], NULL, 10);
        int s = connect_host(port);
        if (strcmp(argv[3], "probe") == 0) {
            if (s < 0)
                printf("CONNECT-ERR=%s\n", strerrorname_np(-s) ? strerrorname_np(-s) : "?");
            else
                printf("CONNECT-OK\n");
            return 0;
        }
        if (s < 0) {
            errno = -s;
            die("connect");
        }
        if (strcmp(argv[3], "echo") == 0 && argc == 5)
            return echo(s, strtoull(argv[4], NULL, 10));
        if (strcmp(argv[3], "send") == 0 && argc == 6)
            return send_data(s, strtoull(argv[4], NULL, 10), (unsigned)strtoul(argv[5], NULL, 10));
    }
    fprintf(stderr, "usage: kiln-vsock serve PORT [COUNT] | connect PORT echo SIZE | "
                    "connect PORT send SIZE SEED | connect PORT probe\n");
    return 2;
}
