/* The kernel cost of one writev of (head, body) against one send of the same bytes joined
 * (memcpy included) and one write, on a loopback TCP connection with a reader on the other core.
 * Why Strait joins small vectored writes (proxy/src/conn.rs, BENCHMARKS.md "Small vectored writes").
 *   gcc -O2 -o /tmp/writev_vs_send benches/writev_vs_send.c -lpthread
 *   /tmp/writev_vs_send 100000 3        # N calls per round, body bytes (head is 250 bytes)
 * Prints CPU time (user + system, this thread) per call, four rounds. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

static void pin(int cpu) {
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    sched_setaffinity(0, sizeof s, &s);
}

static void *drain(void *arg) {
    int fd = *(int *)arg;
    char b[65536];
    pin(0);
    while (read(fd, b, sizeof b) > 0) {
    }
    return 0;
}

static double cpu_now(void) {
    struct rusage r;
    getrusage(RUSAGE_THREAD, &r);
    return r.ru_utime.tv_sec + r.ru_utime.tv_usec / 1e6 + r.ru_stime.tv_sec + r.ru_stime.tv_usec / 1e6;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s CALLS BODY_BYTES\n", argv[0]);
        return 2;
    }
    int n = atoi(argv[1]), bl = atoi(argv[2]), one = 1;
    struct sockaddr_in a = {0};
    socklen_t sl = sizeof a;
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(0x7f000001);
    int l = socket(AF_INET, SOCK_STREAM, 0);
    if (bind(l, (void *)&a, sizeof a) || listen(l, 1) || getsockname(l, (void *)&a, &sl)) {
        perror("listen");
        return 1;
    }
    int c = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(c, (void *)&a, sizeof a)) {
        perror("connect");
        return 1;
    }
    int s = accept(l, 0, 0);
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    pthread_t t;
    pthread_create(&t, 0, drain, &s);
    pin(1);
    char head[250];
    char *body = malloc(bl), *flat = malloc(250 + bl);
    memset(head, 'h', sizeof head);
    memset(body, 'b', bl);
    for (int round = 0; round < 4; round++) {
        double t0 = cpu_now();
        for (int i = 0; i < n; i++) {
            struct iovec v[2] = {{head, 250}, {body, bl}};
            writev(c, v, 2);
        }
        double t1 = cpu_now();
        for (int i = 0; i < n; i++) {
            memcpy(flat, head, 250);
            memcpy(flat + 250, body, bl);
            send(c, flat, 250 + bl, MSG_NOSIGNAL);
        }
        double t2 = cpu_now();
        for (int i = 0; i < n; i++) {
            write(c, flat, 250 + bl);
        }
        double t3 = cpu_now();
        printf("body %d: writev %.0f ns  memcpy+send %.0f ns  write %.0f ns\n", bl, (t1 - t0) / n * 1e9,
               (t2 - t1) / n * 1e9, (t3 - t2) / n * 1e9);
    }
    return 0;
}
