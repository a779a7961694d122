/*
 * tlssink: the benchmark's STARTTLS-capable downstream sink (bench/run.py compiles and runs it).
 *
 * Postfix's smtp-sink has no STARTTLS, and a Postfix smtpd with a discard
 * transport costs about 2.4 ms of CPU per TLS message here: on two shared
 * cores that sink would be a bottleneck. This one accepts mail and drops it:
 * one thread per connection, blocking sockets, OpenSSL for STARTTLS
 * (RFC 3207), replies with enhanced status codes (RFC 2034), PIPELINING-safe
 * (commands are answered in order from the input buffer).
 *
 * Usage: tlssink PORT CERT KEY    (listens on 127.0.0.1:PORT)
 * stdout: the number of messages received so far, one line whenever it
 * changed (checked every 5 ms).
 *
 * Build: gcc -O2 -pthread -o tlssink tlssink.c -lssl -lcrypto
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static SSL_CTX *ssl_ctx;
static atomic_long received;

typedef struct {
    int fd;
    SSL *ssl;
    char buf[65536];
    int len, pos;
} conn_t;

static int conn_write(conn_t *c, const char *data) {
    size_t len = strlen(data);
    while (len > 0) {
        ssize_t n;
        if (c->ssl) {
            int r = SSL_write(c->ssl, data, (int)len);
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

/* Next line (up to and including LF) as [*start, *start + *len); -1 on EOF, error or an overlong line. */
static int read_line(conn_t *c, char **start, int *len) {
    for (;;) {
        char *p = c->buf + c->pos;
        char *nl = memchr(p, '\n', c->len - c->pos);
        if (nl) {
            *start = p;
            *len = (int)(nl - p + 1);
            c->pos += *len;
            return 0;
        }
        if (c->pos > 0) {
            memmove(c->buf, p, c->len - c->pos);
            c->len -= c->pos;
            c->pos = 0;
        }
        if (c->len == (int)sizeof c->buf) return -1;
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
    }
}

static int is(const char *line, int len, const char *verb) {
    size_t vl = strlen(verb);
    return (size_t)len >= vl && strncasecmp(line, verb, vl) == 0;
}

static void *serve(void *arg) {
    conn_t *c = arg;
    char *line;
    int len;
    if (conn_write(c, "220 tlssink.bench.test ESMTP\r\n") < 0) goto out;
    while (read_line(c, &line, &len) == 0) {
        if (is(line, len, "EHLO")) {
            conn_write(c, c->ssl ? "250-tlssink.bench.test\r\n250-PIPELINING\r\n250-SIZE 209715200\r\n"
                                   "250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
                                 : "250-tlssink.bench.test\r\n250-PIPELINING\r\n250-SIZE 209715200\r\n"
                                   "250-8BITMIME\r\n250-STARTTLS\r\n250 ENHANCEDSTATUSCODES\r\n");
        } else if (is(line, len, "HELO")) {
            conn_write(c, "250 tlssink.bench.test\r\n");
        } else if (is(line, len, "STARTTLS") && !c->ssl) {
            if (c->pos != c->len) break;  /* plaintext after STARTTLS: refuse injection (RFC 3207 5) */
            conn_write(c, "220 2.0.0 Ready to start TLS\r\n");
            c->ssl = SSL_new(ssl_ctx);
            SSL_set_fd(c->ssl, c->fd);
            if (SSL_accept(c->ssl) != 1) break;
            c->len = c->pos = 0;
        } else if (is(line, len, "MAIL")) {
            conn_write(c, "250 2.1.0 Ok\r\n");
        } else if (is(line, len, "RCPT")) {
            conn_write(c, "250 2.1.5 Ok\r\n");
        } else if (is(line, len, "DATA")) {
            conn_write(c, "354 End data with <CR><LF>.<CR><LF>\r\n");
            int done = 0;
            while (read_line(c, &line, &len) == 0) {
                if ((len == 3 && memcmp(line, ".\r\n", 3) == 0) || (len == 2 && memcmp(line, ".\n", 2) == 0)) {
                    done = 1;
                    break;
                }
            }
            if (!done) break;
            atomic_fetch_add(&received, 1);
            conn_write(c, "250 2.0.0 Ok: queued\r\n");
        } else if (is(line, len, "RSET") || is(line, len, "NOOP")) {
            conn_write(c, "250 2.0.0 Ok\r\n");
        } else if (is(line, len, "QUIT")) {
            conn_write(c, "221 2.0.0 Bye\r\n");
            break;
        } else {
            conn_write(c, "502 5.5.2 Command not recognized\r\n");
        }
    }
out:
    if (c->ssl) {
        SSL_shutdown(c->ssl);
        SSL_free(c->ssl);
    }
    close(c->fd);
    free(c);
    return NULL;
}

static void *reporter(void *arg) {
    (void)arg;
    long last = -1;
    struct timespec ts = {0, 5 * 1000 * 1000};
    for (;;) {
        long now = atomic_load(&received);
        if (now != last) {
            printf("%ld\n", now);
            fflush(stdout);
            last = now;
        }
        nanosleep(&ts, NULL);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: tlssink PORT CERT KEY\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    ssl_ctx = SSL_CTX_new(TLS_server_method());
    SSL_CTX_set_min_proto_version(ssl_ctx, TLS1_2_VERSION);
    if (SSL_CTX_use_certificate_chain_file(ssl_ctx, argv[2]) != 1 ||
        SSL_CTX_use_PrivateKey_file(ssl_ctx, argv[3], SSL_FILETYPE_PEM) != 1) {
        fprintf(stderr, "tlssink: cannot load %s / %s\n", argv[2], argv[3]);
        return 1;
    }
    int lfd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(lfd, 4096) < 0) {
        perror("tlssink: listen");
        return 1;
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t t;
    pthread_create(&t, &attr, reporter, NULL);
    for (;;) {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (errno == EMFILE || errno == ENFILE) {  /* out of descriptors: let connections close */
                usleep(10000);
                continue;
            }
            perror("tlssink: accept");
            return 1;
        }
        struct timeval tv = {300, 0};  /* an idle client is dropped after 5 min (RFC 5321 4.5.3.2.7) */
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        conn_t *c = calloc(1, sizeof *c);
        c->fd = fd;
        if (pthread_create(&t, &attr, serve, c) != 0) {
            close(fd);
            free(c);
        }
    }
}
