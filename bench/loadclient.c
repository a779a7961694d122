/*
 * loadclient: the benchmark's SMTP load client (bench/run.py compiles and runs it).
 *
 * One thread per concurrent session, blocking sockets, OpenSSL for STARTTLS
 * (RFC 3207). Each session: greeting, EHLO, [STARTTLS, EHLO], then K
 * transactions MAIL/RCPT/DATA (RFC 5321; no pipelining), then QUIT. The
 * message is built once, with CRLF line ends and dot-stuffing (RFC 5321
 * 4.5.2); each transaction gets its own Message-ID.
 *
 * Bounded: at most -n messages in all, no new transaction after -T seconds,
 * and every socket read/write times out after -w seconds.
 *
 * Fixed rate (-R MSGS_PER_S): transaction i may start no earlier than
 * t_start + i/R (an open-loop schedule shared by all sessions), so the offered
 * load is R whatever the target's speed; a transaction that starts more than
 * 10 ms behind its slot is counted in "late" (the target, or the sessions,
 * could not keep up). Without -R every session sends as fast as it can.
 *
 * Latency of one message: from sending MAIL FROM to reading the final reply
 * after the end-of-data dot, in microseconds (one per line in the -o file).
 *
 * stdout: one JSON line {"sent":N,"errors":N,"elapsed_s":F,"cpu_s":F,...}
 * where cpu_s is this process's own user+system CPU time (all threads).
 *
 * Build: gcc -O2 -pthread -o loadclient loadclient.c -lssl -lcrypto
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static const char *opt_host = "127.0.0.1";
static int opt_port = 0, opt_sessions = 1, opt_per_conn = 1, opt_tls = 0;
static long opt_messages = 1, opt_size = 4096;
static double opt_time_limit = 60.0, opt_io_timeout = 30.0, opt_rate = 0.0;
static const char *opt_out = NULL, *opt_rcpt = "user@bench.test", *opt_from = "sender@client.bench.test";

static SSL_CTX *ssl_ctx;
static char *body;          /* headers after Message-ID and the dot-stuffed body */
static size_t body_len;
static double t_start, deadline;
static atomic_long remaining, sent, errors, skipped, lat_index, ticket, late;
static float *latencies;    /* microseconds, one per sent message */
static pthread_mutex_t err_lock = PTHREAD_MUTEX_INITIALIZER;
static int err_printed;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void note_error(const char *what, const char *detail) {
    pthread_mutex_lock(&err_lock);
    if (err_printed < 10) {  /* a few examples are enough to see what went wrong */
        fprintf(stderr, "loadclient: %s: %s\n", what, detail);
        err_printed++;
    }
    pthread_mutex_unlock(&err_lock);
}

typedef struct {
    int fd;
    SSL *ssl;
    char buf[16384];
    int len, pos;
    char line[1024];  /* the last reply line, for error messages */
} conn_t;

static int conn_write(conn_t *c, const char *data, size_t len) {
    while (len > 0) {
        ssize_t n;
        if (c->ssl) {
            int r = SSL_write(c->ssl, data, len > 1 << 30 ? 1 << 30 : (int)len);
            if (r <= 0) return -1;
            n = r;
        } else {
            n = send(c->fd, data, len, MSG_NOSIGNAL);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) return -1;
        }
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

static int conn_fill(conn_t *c) {
    if (c->pos > 0) {
        memmove(c->buf, c->buf + c->pos, c->len - c->pos);
        c->len -= c->pos;
        c->pos = 0;
    }
    if (c->len == (int)sizeof c->buf) return -1;  /* a reply line longer than the buffer */
    ssize_t n;
    if (c->ssl) {
        int r = SSL_read(c->ssl, c->buf + c->len, sizeof c->buf - c->len);
        if (r <= 0) return -1;
        n = r;
    } else {
        do n = recv(c->fd, c->buf + c->len, sizeof c->buf - c->len, 0); while (n < 0 && errno == EINTR);
        if (n <= 0) return -1;
    }
    c->len += (int)n;
    return 0;
}

/* Read one reply (multi-line: "250-..." lines then "250 ..."); return its code, -1 on error. */
static int read_reply(conn_t *c) {
    for (;;) {
        char *start = c->buf + c->pos;
        char *nl = memchr(start, '\n', c->len - c->pos);
        if (!nl) {
            if (conn_fill(c) < 0) return -1;
            continue;
        }
        size_t l = (size_t)(nl - start + 1);
        size_t keep = l < sizeof c->line - 1 ? l : sizeof c->line - 1;
        memcpy(c->line, start, keep);
        c->line[keep] = 0;
        c->pos += (int)l;
        if (l < 4 || start[0] < '2' || start[0] > '5') return -1;
        int code = (start[0] - '0') * 100 + (start[1] - '0') * 10 + (start[2] - '0');
        if (start[3] == '-') continue;  /* continuation line */
        return code;
    }
}

static int command(conn_t *c, const char *cmd, int expect) {
    if (conn_write(c, cmd, strlen(cmd)) < 0) return -1;
    int code = read_reply(c);
    if (code != expect) {
        char what[128];
        snprintf(what, sizeof what, "%.40s -> %d", cmd, code);
        what[strcspn(what, "\r\n")] = ' ';
        note_error(what, code < 0 ? "connection lost or timed out" : c->line);
        return -1;
    }
    return 0;
}

/* With -R: wait for this transaction's slot in the shared schedule. */
static void pace(void) {
    if (opt_rate <= 0) return;
    double slot = t_start + (double)atomic_fetch_add(&ticket, 1) / opt_rate, wait = slot - now();
    if (wait > 0) {
        struct timespec ts = {(time_t)wait, (long)((wait - (long)wait) * 1e9)};
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {}
    } else if (wait < -0.010) {
        atomic_fetch_add(&late, 1);
    }
}

static int tcp_connect(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    struct timeval tv = {(time_t)opt_io_timeout, (suseconds_t)((opt_io_timeout - (long)opt_io_timeout) * 1e6)};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(opt_port)};
    inet_pton(AF_INET, opt_host, &sa.sin_addr);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        note_error("connect", strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

/* One SMTP session with up to `count` transactions; returns how many were accepted.
 * Messages not tried because the time limit passed are added to `skipped`, not to the errors. */
static long session(long count, long thread_id, long *seq) {
    conn_t *c = calloc(1, sizeof *c);
    long done = 0;
    c->fd = tcp_connect();
    if (c->fd < 0) goto out;
    if (read_reply(c) != 220) { note_error("greeting", c->line); goto out; }
    if (command(c, "EHLO loadclient.bench.test\r\n", 250) < 0) goto out;
    if (opt_tls) {
        if (command(c, "STARTTLS\r\n", 220) < 0) goto out;
        if (c->pos != c->len) { note_error("STARTTLS", "bytes after 220 (injection?)"); goto out; }
        c->ssl = SSL_new(ssl_ctx);
        SSL_set_fd(c->ssl, c->fd);
        SSL_set_tlsext_host_name(c->ssl, "mx.bench.test");
        if (SSL_connect(c->ssl) != 1) {
            char e[256];
            ERR_error_string_n(ERR_get_error(), e, sizeof e);
            note_error("TLS handshake", e);
            goto out;
        }
        if (command(c, "EHLO loadclient.bench.test\r\n", 250) < 0) goto out;
    }
    char mail[512], rcpt[512], head[256];
    snprintf(mail, sizeof mail, "MAIL FROM:<%s> SIZE=%ld\r\n", opt_from, opt_size);
    snprintf(rcpt, sizeof rcpt, "RCPT TO:<%s>\r\n", opt_rcpt);
    for (long i = 0; i < count; i++) {
        if (now() > deadline) {
            atomic_fetch_add(&skipped, count - i);
            count = i;
            break;
        }
        if (i > 0) pace();  /* the first slot was waited for before connecting */
        double t0 = now();
        if (command(c, mail, 250) < 0) goto out;
        if (command(c, rcpt, 250) < 0) goto out;
        if (command(c, "DATA\r\n", 354) < 0) goto out;
        int hl = snprintf(head, sizeof head, "Message-ID: <%ld.%ld@loadclient.bench.test>\r\n", thread_id, (*seq)++);
        if (conn_write(c, head, hl) < 0 || conn_write(c, body, body_len) < 0) goto out;
        if (command(c, ".\r\n", 250) < 0) goto out;
        double t1 = now();
        long idx = atomic_fetch_add(&lat_index, 1);
        latencies[idx] = (float)((t1 - t0) * 1e6);
        done++;
        atomic_fetch_add(&sent, 1);
    }
    command(c, "QUIT\r\n", 221);
out:
    if (done < count) atomic_fetch_add(&errors, count - done);
    if (c->ssl) {
        SSL_shutdown(c->ssl);  /* send close_notify; do not wait for the peer's */
        SSL_free(c->ssl);
    }
    if (c->fd >= 0) close(c->fd);
    free(c);
    return done;
}

static void *worker(void *arg) {
    long id = (long)arg, seq = 0;
    while (now() < deadline) {
        long before = atomic_fetch_sub(&remaining, opt_per_conn);
        if (before <= 0) break;
        long want = before < opt_per_conn ? before : opt_per_conn;
        pace();
        session(want, id, &seq);
    }
    return NULL;
}

/* The common part of every message: headers after Message-ID, then a text body of about opt_size bytes. */
static void build_body(void) {
    static const char *words[] = {"gateway", "message", "delivery", "invoice", "meeting", "the", "of", "and",
                                  "report", "quarterly", "server", "please", "find", "attached", "regards"};
    size_t cap = (size_t)opt_size * 2 + 4096, n = 0;
    body = malloc(cap);
    n += snprintf(body + n, cap - n,
                  "From: Bench Sender <%s>\r\nTo: <%s>\r\nSubject: benchmark message\r\n"
                  "Date: Mon, 02 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
                  "Content-Type: text/plain; charset=us-ascii\r\n\r\n", opt_from, opt_rcpt);
    unsigned w = 1;
    long line_no = 0;
    while ((long)n < opt_size) {
        size_t ll = 0;
        line_no++;
        if (line_no % 50 == 0) {  /* a text line starting with a dot, dot-stuffed (RFC 5321 4.5.2) */
            body[n + ll++] = '.';
            body[n + ll++] = '.';
        }
        while (ll < 72) {
            w = w * 1103515245u + 12345u;
            const char *word = words[(w >> 16) % (sizeof words / sizeof *words)];
            size_t wl = strlen(word);
            memcpy(body + n + ll, word, wl);
            ll += wl;
            body[n + ll++] = ' ';
        }
        body[n + ll++] = '\r';
        body[n + ll++] = '\n';
        n += ll;
    }
    body_len = n;
}

static void usage(void) {
    fprintf(stderr, "usage: loadclient -p PORT [-H HOST] [-c SESSIONS] [-n MESSAGES] [-k PER_CONN] [-s SIZE]\n"
                    "                  [-t] [-T SECONDS] [-w IO_TIMEOUT] [-o LATENCY_FILE] [-r RCPT] [-f FROM] [-R MSGS_PER_S]\n");
    exit(2);
}

int main(int argc, char **argv) {
    int opt;
    while ((opt = getopt(argc, argv, "H:p:c:n:k:s:tT:w:o:r:f:R:")) != -1) {
        switch (opt) {
        case 'H': opt_host = optarg; break;
        case 'p': opt_port = atoi(optarg); break;
        case 'c': opt_sessions = atoi(optarg); break;
        case 'n': opt_messages = atol(optarg); break;
        case 'k': opt_per_conn = atoi(optarg); break;
        case 's': opt_size = atol(optarg); break;
        case 't': opt_tls = 1; break;
        case 'T': opt_time_limit = atof(optarg); break;
        case 'w': opt_io_timeout = atof(optarg); break;
        case 'o': opt_out = optarg; break;
        case 'r': opt_rcpt = optarg; break;
        case 'f': opt_from = optarg; break;
        case 'R': opt_rate = atof(optarg); break;
        default: usage();
        }
    }
    if (opt_port <= 0 || opt_sessions < 1 || opt_sessions > 5000 || opt_messages < 1 || opt_per_conn < 1 ||
        opt_size < 0 || opt_time_limit <= 0 || opt_io_timeout <= 0 || opt_rate < 0)
        usage();
    signal(SIGPIPE, SIG_IGN);
    ssl_ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_min_proto_version(ssl_ctx, TLS1_2_VERSION);
    SSL_CTX_set_verify(ssl_ctx, SSL_VERIFY_NONE, NULL);  /* self-signed bench certificates */
    SSL_CTX_set_session_cache_mode(ssl_ctx, SSL_SESS_CACHE_OFF);  /* a full handshake per session */
    build_body();
    latencies = calloc((size_t)opt_messages, sizeof *latencies);
    atomic_store(&remaining, opt_messages);

    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    t_start = now();
    deadline = t_start + opt_time_limit;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    pthread_t *threads = calloc((size_t)opt_sessions, sizeof *threads);
    for (long i = 0; i < opt_sessions; i++) pthread_create(&threads[i], &attr, worker, (void *)i);
    for (long i = 0; i < opt_sessions; i++) pthread_join(threads[i], NULL);
    double elapsed = now() - t_start;
    getrusage(RUSAGE_SELF, &ru1);
    double cpu = (ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) + (ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) / 1e6 +
                 (ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) + (ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;
    long unsent = atomic_load(&remaining);
    unsent = (unsent > 0 ? unsent : 0) + atomic_load(&skipped);
    long n_sent = atomic_load(&sent);
    if (opt_out) {
        FILE *f = fopen(opt_out, "w");
        if (!f) { perror(opt_out); return 1; }
        for (long i = 0; i < n_sent; i++) fprintf(f, "%.1f\n", latencies[i]);
        fclose(f);
    }
    printf("{\"sent\":%ld,\"errors\":%ld,\"not_attempted\":%ld,\"elapsed_s\":%.6f,\"cpu_s\":%.6f,"
           "\"sessions\":%d,\"per_conn\":%d,\"size\":%ld,\"message_bytes\":%zu,\"tls\":%s,"
           "\"rate\":%.3f,\"late\":%ld}\n",
           n_sent, atomic_load(&errors), unsent, elapsed, cpu, opt_sessions, opt_per_conn,
           opt_size, body_len, opt_tls ? "true" : "false", opt_rate, atomic_load(&late));
    return 0;
}
