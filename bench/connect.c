/* A bounded connect-latency generator: new TCP connections to one address, as fast as a few
 * in flight allow, and the time each connect() took (SYN out to SYN-ACK in: the first packet
 * of a connection, the one a proxy's rules act on). Built by bench/dataplane.py with the
 * machine's C compiler; Python's own client tops out near 3k connections a second and adds
 * milliseconds of its own to every figure.
 *
 *   connect IP PORT COUNT INFLIGHT SECONDS
 *
 * Stops after COUNT connections or SECONDS, whichever comes first. Each connection is closed
 * with a reset (SO_LINGER 0), so no TIME_WAIT piles up and every attempt gets a fresh source
 * port. Prints one JSON object: done, errors by kind, elapsed seconds, and the latencies in
 * microseconds at the 50th, 90th, 99th and 99.9th percentiles and the maximum.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_INFLIGHT 64

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

struct slot {
    int fd;
    double started;
};

static int start(const struct sockaddr_storage *dst, socklen_t len, int family) {
    int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct linger lg = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    if (connect(fd, (const struct sockaddr *)dst, len) < 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    return fd;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s IP PORT COUNT INFLIGHT SECONDS\n", argv[0]);
        return 2;
    }
    struct sockaddr_storage dst;
    memset(&dst, 0, sizeof dst);
    socklen_t len;
    int family;
    struct sockaddr_in *v4 = (struct sockaddr_in *)&dst;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&dst;
    if (inet_pton(AF_INET, argv[1], &v4->sin_addr) == 1) {
        family = AF_INET;
        v4->sin_family = AF_INET;
        v4->sin_port = htons(atoi(argv[2]));
        len = sizeof *v4;
    } else if (inet_pton(AF_INET6, argv[1], &v6->sin6_addr) == 1) {
        family = AF_INET6;
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons(atoi(argv[2]));
        len = sizeof *v6;
    } else {
        fprintf(stderr, "not an IP address: %s\n", argv[1]);
        return 2;
    }
    long count = atol(argv[3]);
    int inflight = atoi(argv[4]);
    double seconds = atof(argv[5]);
    if (count <= 0 || inflight <= 0 || inflight > MAX_INFLIGHT || seconds <= 0) {
        fprintf(stderr, "COUNT > 0, 1 <= INFLIGHT <= %d, SECONDS > 0\n", MAX_INFLIGHT);
        return 2;
    }
    double *lat = malloc(sizeof(double) * count);
    if (!lat)
        return 1;
    struct slot slots[MAX_INFLIGHT];
    struct pollfd pfd[MAX_INFLIGHT];
    long started = 0, done = 0, refused = 0, timeouts = 0, other = 0;
    double t0 = now(), deadline = t0 + seconds;
    const double attempt_timeout = 3.0;
    for (int i = 0; i < inflight; i++)
        slots[i].fd = -1;
    while (done < count) {
        double t = now();
        if (t >= deadline)
            break;
        for (int i = 0; i < inflight; i++) {
            if (slots[i].fd < 0 && started < count) {
                slots[i].started = now();
                slots[i].fd = start(&dst, len, family);
                if (slots[i].fd < 0) {
                    other++;
                    done++;
                    continue;
                }
                started++;
            }
            pfd[i].fd = slots[i].fd;
            pfd[i].events = POLLOUT;
            pfd[i].revents = 0;
        }
        int n = poll(pfd, inflight, 100);
        if (n < 0 && errno != EINTR)
            break;
        t = now();
        for (int i = 0; i < inflight; i++) {
            if (slots[i].fd < 0)
                continue;
            if (pfd[i].revents) {
                int err = 0;
                socklen_t elen = sizeof err;
                getsockopt(slots[i].fd, SOL_SOCKET, SO_ERROR, &err, &elen);
                if (err == 0)
                    lat[done - refused - timeouts - other] = (t - slots[i].started) * 1e6;
                else if (err == ECONNREFUSED)
                    refused++;
                else
                    other++;
                done++;
                close(slots[i].fd);
                slots[i].fd = -1;
            } else if (t - slots[i].started > attempt_timeout) {
                timeouts++;
                done++;
                close(slots[i].fd);
                slots[i].fd = -1;
            }
        }
    }
    double elapsed = now() - t0;
    for (int i = 0; i < inflight; i++)
        if (slots[i].fd >= 0)
            close(slots[i].fd);
    long ok = done - refused - timeouts - other;
    qsort(lat, ok, sizeof(double), cmp);
#define PCT(p) (ok ? lat[(long)((ok - 1) * (p))] : -1.0)
    printf("{\"connections\": %ld, \"ok\": %ld, \"refused\": %ld, \"timeout\": %ld, \"other\": %ld, "
           "\"seconds\": %.3f, \"p50_us\": %.1f, \"p90_us\": %.1f, \"p99_us\": %.1f, \"p999_us\": %.1f, "
           "\"max_us\": %.1f}\n",
           done, ok, refused, timeouts, other, elapsed, PCT(0.50), PCT(0.90), PCT(0.99), PCT(0.999),
           ok ? lat[ok - 1] : -1.0);
    free(lat);
    return 0;
}
