/*
 * ccci guest agent: runs step commands for the host over one virtio-serial port.
 *
 * One process, one poll loop, any number of concurrent commands. Every message in either
 * direction is a frame: u8 type, u32 id, u32 length (little endian), then `length` bytes.
 *
 *   host -> guest                                guest -> host
 *   EXEC  id  flags u32, cwd\0 command\0 K=V\0…   READY 0   once, when the agent starts
 *   STDIN id  bytes (empty: end of input)         OUT   id  stream u8 (1 out, 2 err), bytes
 *   KILL  id  (SIGKILL the command's group)       EXIT  id  status i32 (code, or 128+signal)
 *   SETUP id  epoch_ns u64, hostname\0, entropy   FAIL  id  message (the command never started)
 *   PING  id                                      ACK   id  (answers SETUP and PING)
 *
 * A command's EXIT is sent only after everything it wrote to its pipes has been sent, so the
 * host sees all of its output before its status. Build: gcc -static -Os -o agent agent.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum { T_EXEC = 1, T_STDIN = 2, T_KILL = 3, T_SETUP = 4, T_PING = 5 };
enum { T_READY = 64, T_OUT = 65, T_EXIT = 66, T_FAIL = 67, T_ACK = 68 };
enum { HDR = 9, MAX_FRAME = 1 << 20, MAX_JOBS = 256, CHUNK = 65536 };

struct job {
    uint32_t id;
    pid_t pid;          /* 0 once reaped */
    int status;         /* exit status, valid once reaped */
    int out, err, in;   /* -1 when closed */
    char *pending;      /* stdin bytes not yet written to the child */
    size_t npending;
    int in_eof;         /* the host sent the end of stdin */
    int live;           /* started and its EXIT not yet sent */
};

static int port = -1;
static int sigpipe_fds[2];
static struct job jobs[MAX_JOBS];
static unsigned char rbuf[HDR + MAX_FRAME];
static size_t rlen;

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void put32(unsigned char *p, uint32_t v) {
    p[0] = v; p[1] = v >> 8; p[2] = v >> 16; p[3] = v >> 24;
}

static uint32_t get32(const unsigned char *p) {
    return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24;
}

static void write_all(const void *buf, size_t n) {
    const char *p = buf;
    while (n) {
        ssize_t w = write(port, p, n);
        if (w < 0) {
            if (errno == EINTR || errno == EAGAIN) {
                struct pollfd pf = {port, POLLOUT, 0};
                poll(&pf, 1, -1);
                continue;
            }
            die("write port");
        }
        p += w;
        n -= w;
    }
}

static void send_frame(int type, uint32_t id, const void *a, size_t na, const void *b, size_t nb) {
    unsigned char h[HDR];
    h[0] = type;
    put32(h + 1, id);
    put32(h + 5, na + nb);
    write_all(h, HDR);
    if (na) write_all(a, na);
    if (nb) write_all(b, nb);
}

static void on_sigchld(int sig) {
    (void)sig;
    int e = errno;
    (void)!write(sigpipe_fds[1], "c", 1);
    errno = e;
}

static struct job *find(uint32_t id) {
    for (int i = 0; i < MAX_JOBS; i++)
        if (jobs[i].live && jobs[i].id == id) return &jobs[i];
    return NULL;
}

static void close_fd(int *fd) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

/* Forward what the child wrote; returns 0 at end of file. */
static int pump(struct job *j, int *fd, unsigned char stream) {
    static char buf[CHUNK];
    ssize_t n = read(*fd, buf, sizeof buf);
    if (n > 0) {
        send_frame(T_OUT, j->id, &stream, 1, buf, n);
        return 1;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return 1;
    close_fd(fd);
    return 0;
}

static void finish_if_done(struct job *j) {
    if (!j->live || j->pid || j->out >= 0 || j->err >= 0) return;
    unsigned char s[4];
    put32(s, (uint32_t)j->status);
    close_fd(&j->in);
    free(j->pending);
    j->pending = NULL;
    j->npending = 0;
    send_frame(T_EXIT, j->id, s, 4, NULL, 0);
    j->id = 0;
    j->live = 0;
}

static void reap(void) {
    int st;
    pid_t pid;
    while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
        for (int i = 0; i < MAX_JOBS; i++) {
            struct job *j = &jobs[i];
            if (!j->live || j->pid != pid) continue;
            j->pid = 0;
            j->status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
            /* Drain what is already in the pipes, then stop: a background grandchild that keeps
             * them open must not hold the command's exit hostage. */
            while (j->out >= 0 && pump(j, &j->out, 1)) {
                struct pollfd pf = {j->out, POLLIN, 0};
                if (poll(&pf, 1, 0) <= 0) break;
            }
            while (j->err >= 0 && pump(j, &j->err, 2)) {
                struct pollfd pf = {j->err, POLLIN, 0};
                if (poll(&pf, 1, 0) <= 0) break;
            }
            close_fd(&j->out);
            close_fd(&j->err);
            finish_if_done(j);
        }
    }
}

static void start(uint32_t id, const unsigned char *p, uint32_t n) {
    if (n < 4 || p[n - 1] != 0) {
        send_frame(T_FAIL, id, "malformed EXEC", 14, NULL, 0);
        return;
    }
    uint32_t flags = get32(p);
    const char *cwd = (const char *)p + 4;
    const char *cmd = cwd + strlen(cwd) + 1;
    if ((const unsigned char *)cmd >= p + n) {
        send_frame(T_FAIL, id, "malformed EXEC", 14, NULL, 0);
        return;
    }
    const char *envp_start = cmd + strlen(cmd) + 1;
    struct job *j = NULL;
    for (int i = 0; i < MAX_JOBS && !j; i++)
        if (!jobs[i].live) j = &jobs[i];
    if (!j || find(id)) {
        const char *m = j ? "duplicate id" : "too many commands";
        send_frame(T_FAIL, id, m, strlen(m), NULL, 0);
        return;
    }
    int po[2], pe[2], pi[2];
    if (pipe2(po, O_CLOEXEC) || pipe2(pe, O_CLOEXEC) || pipe2(pi, O_CLOEXEC)) {
        const char *m = strerror(errno);
        send_frame(T_FAIL, id, m, strlen(m), NULL, 0);
        return;
    }
    int nenv = 0;
    for (const char *e = envp_start; (const unsigned char *)e < p + n; e += strlen(e) + 1) nenv++;
    char **envp = calloc(nenv + 1, sizeof *envp);
    int k = 0;
    for (const char *e = envp_start; (const unsigned char *)e < p + n; e += strlen(e) + 1)
        envp[k++] = (char *)e;
    pid_t pid = fork();
    if (pid == 0) {
        setsid();
        signal(SIGCHLD, SIG_DFL);
        signal(SIGPIPE, SIG_DFL);
        dup2(pi[0], 0);
        dup2(po[1], 1);
        dup2(pe[1], 2);
        if (chdir(cwd) != 0) {
            dprintf(2, "ccci-agent: cannot enter %s: %s\n", cwd, strerror(errno));
            _exit(127);
        }
        char *argv[] = {"/bin/sh", "-c", (char *)cmd, NULL};
        execve("/bin/sh", argv, envp);
        dprintf(2, "ccci-agent: exec /bin/sh: %s\n", strerror(errno));
        _exit(127);
    }
    free(envp);
    close(pi[0]);
    close(po[1]);
    close(pe[1]);
    if (pid < 0) {
        close(pi[1]);
        close(po[0]);
        close(pe[0]);
        const char *m = strerror(errno);
        send_frame(T_FAIL, id, m, strlen(m), NULL, 0);
        return;
    }
    fcntl(po[0], F_SETFL, O_NONBLOCK);
    fcntl(pe[0], F_SETFL, O_NONBLOCK);
    fcntl(pi[1], F_SETFL, O_NONBLOCK);
    *j = (struct job){.id = id, .pid = pid, .out = po[0], .err = pe[0], .in = pi[1], .live = 1};
    if (!(flags & 1)) close_fd(&j->in); /* no stdin: the command reads end of file */
}

static void feed(struct job *j) {
    while (j->npending && j->in >= 0) {
        ssize_t w = write(j->in, j->pending, j->npending);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR) return;
            close_fd(&j->in); /* the command stopped reading; drop the rest */
            j->npending = 0;
            return;
        }
        memmove(j->pending, j->pending + w, j->npending - w);
        j->npending -= w;
    }
    if (!j->npending && j->in_eof) close_fd(&j->in);
}

static void setup(uint32_t id, const unsigned char *p, uint32_t n) {
    if (n >= 9) {
        uint64_t ns = get32(p) | (uint64_t)get32(p + 4) << 32;
        struct timespec ts = {ns / 1000000000ull, ns % 1000000000ull};
        clock_settime(CLOCK_REALTIME, &ts);
        const char *host = (const char *)p + 8;
        size_t hl = strnlen(host, n - 8);
        if (hl && hl < n - 8) sethostname(host, hl);
        size_t off = 8 + hl + 1;
        if (off < n) {
            /* Forks share the base's RNG state: credit fresh host entropy and reseed now. */
            size_t len = n - off;
            struct rand_pool_info *info = malloc(sizeof *info + len);
            info->entropy_count = len * 8;
            info->buf_size = len;
            memcpy(info->buf, p + off, len);
            int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
            if (fd >= 0) {
                ioctl(fd, RNDADDENTROPY, info);
                ioctl(fd, RNDRESEEDCRNG);
                close(fd);
            }
            free(info);
        }
    }
    send_frame(T_ACK, id, NULL, 0, NULL, 0);
}

static void handle(int type, uint32_t id, const unsigned char *p, uint32_t n) {
    struct job *j;
    switch (type) {
    case T_EXEC:
        start(id, p, n);
        break;
    case T_STDIN:
        if (!(j = find(id)) || j->in < 0) break;
        if (n == 0) {
            j->in_eof = 1;
        } else {
            j->pending = realloc(j->pending, j->npending + n);
            memcpy(j->pending + j->npending, p, n);
            j->npending += n;
        }
        feed(j);
        break;
    case T_KILL:
        if ((j = find(id)) && j->pid) kill(-j->pid, SIGKILL);
        break;
    case T_SETUP:
        setup(id, p, n);
        break;
    case T_PING:
        send_frame(T_ACK, id, NULL, 0, NULL, 0);
        break;
    }
}

static void read_port(void) {
    ssize_t r = read(port, rbuf + rlen, sizeof rbuf - rlen);
    if (r <= 0) {
        if (r < 0 && errno != EAGAIN && errno != EINTR) die("read port");
        return;
    }
    rlen += r;
    size_t off = 0;
    while (rlen - off >= HDR) {
        uint32_t n = get32(rbuf + off + 5);
        if (n > MAX_FRAME) {
            fprintf(stderr, "ccci-agent: oversized frame (%u bytes); resynchronising\n", n);
            rlen = off = 0;
            return;
        }
        if (rlen - off < HDR + n) break;
        handle(rbuf[off], get32(rbuf + off + 1), rbuf + off + HDR, n);
        off += HDR + n;
    }
    memmove(rbuf, rbuf + off, rlen - off);
    rlen -= off;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s /dev/vportNpM\n", argv[0]);
        return 2;
    }
    /* Virtio-serial ports allow one open at a time: open once, read and write through it. */
    port = open(argv[1], O_RDWR | O_CLOEXEC);
    if (port < 0) die(argv[1]);
    for (int i = 0; i < MAX_JOBS; i++) jobs[i] = (struct job){.out = -1, .err = -1, .in = -1};
    if (pipe2(sigpipe_fds, O_CLOEXEC | O_NONBLOCK)) die("pipe");
    struct sigaction sa = {.sa_handler = on_sigchld, .sa_flags = SA_RESTART | SA_NOCLDSTOP};
    sigaction(SIGCHLD, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    send_frame(T_READY, 0, NULL, 0, NULL, 0);

    static struct pollfd pfd[2 + 3 * MAX_JOBS];
    static struct job *owner[2 + 3 * MAX_JOBS];
    static int kind[2 + 3 * MAX_JOBS];
    for (;;) {
        int np = 0;
        pfd[np++] = (struct pollfd){port, POLLIN, 0};
        pfd[np++] = (struct pollfd){sigpipe_fds[0], POLLIN, 0};
        for (int i = 0; i < MAX_JOBS; i++) {
            struct job *j = &jobs[i];
            if (j->out >= 0) owner[np] = j, kind[np] = 1, pfd[np++] = (struct pollfd){j->out, POLLIN, 0};
            if (j->err >= 0) owner[np] = j, kind[np] = 2, pfd[np++] = (struct pollfd){j->err, POLLIN, 0};
            if (j->in >= 0 && j->npending)
                owner[np] = j, kind[np] = 0, pfd[np++] = (struct pollfd){j->in, POLLOUT, 0};
        }
        if (poll(pfd, np, -1) < 0) {
            if (errno == EINTR) continue;
            die("poll");
        }
        for (int i = 2; i < np; i++) {
            if (!pfd[i].revents) continue;
            struct job *j = owner[i];
            if (kind[i] == 0)
                feed(j);
            else if (kind[i] == 1 && j->out == pfd[i].fd)
                pump(j, &j->out, 1);
            else if (kind[i] == 2 && j->err == pfd[i].fd)
                pump(j, &j->err, 2);
            finish_if_done(j);
        }
        if (pfd[1].revents) {
            char c[64];
            while (read(sigpipe_fds[0], c, sizeof c) > 0) {
            }
            reap();
        }
        if (pfd[0].revents) read_port();
    }
}
