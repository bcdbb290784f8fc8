// H3 probe: does the user FS base (or TLS memory) change under the process?
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sched.h>
#include <time.h>
#include <sys/wait.h>
#include <asm/prctl.h>
#include <sys/syscall.h>

static __thread volatile unsigned long tv = 0x1234567890abcdefUL;
static unsigned long base;

static inline unsigned long fs0(void) { unsigned long v; asm volatile("mov %%fs:0,%0" : "=r"(v)); return v; }

static int check(const char *what, long i)
{
	unsigned long s = fs0(), t = tv, cur = 0;
	if (s != base || t != 0x1234567890abcdefUL) {
		syscall(SYS_arch_prctl, ARCH_GET_FS, &cur);
		printf("FST-BAD %s i=%ld fs0=%lx base=%lx tv=%lx getfs=%lx direct=%lx\n", what, i, s, base, t, cur,
		       *(volatile unsigned long *)base);
		fflush(stdout);
		return 1;
	}
	return 0;
}

int main(int argc, char **argv)
{
	long n = argc > 2 ? atol(argv[2]) : 1000;
	const char *mode = argc > 1 ? argv[1] : "spin";
	int bad = 0;
	syscall(SYS_arch_prctl, ARCH_GET_FS, &base);
	if (!strcmp(mode, "once"))
		return check("once", 0) ? 3 : 0;
	if (!strcmp(mode, "spin")) {
		for (long i = 0; i < n * 1000000L; i++)
			bad += check("spin", i);
	} else if (!strcmp(mode, "yield")) {
		for (long i = 0; i < n; i++) { sched_yield(); bad += check("yield", i); }
	} else if (!strcmp(mode, "sleep")) {
		struct timespec ts = {0, 1000000};
		for (long i = 0; i < n; i++) { nanosleep(&ts, 0); bad += check("sleep", i); }
	} else if (!strcmp(mode, "pipe")) {
		int a[2], b[2]; char c = 0;
		if (pipe(a) || pipe(b)) return 2;
		pid_t p = fork();
		if (p == 0) {
			for (long i = 0; i < n; i++) { if (read(a[0], &c, 1) != 1) break; bad += check("pipe-child", i); write(b[1], &c, 1); }
			_exit(bad ? 1 : 0);
		}
		for (long i = 0; i < n; i++) { write(a[1], &c, 1); if (read(b[0], &c, 1) != 1) break; bad += check("pipe-parent", i); }
		int st; waitpid(p, &st, 0); if (!WIFEXITED(st) || WEXITSTATUS(st)) bad++;
	} else if (!strcmp(mode, "exec")) {
		for (long i = 0; i < n; i++) {
			pid_t p = fork();
			if (p == 0) { execl("/proc/self/exe", "fst", "once", (char *)0); _exit(127); }
			int st; waitpid(p, &st, 0);
			if (!WIFEXITED(st) || WEXITSTATUS(st)) { bad++; printf("FST-BAD exec child status %x\n", st); fflush(stdout); }
		}
	}
	printf("FST %s n=%ld bad=%d\n", mode, n, bad);
	return bad != 0;
}
