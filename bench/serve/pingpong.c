/* Round trip of one cache line between a thread on CPU 0 and one on CPU 1, in ns.

   Tells whether the two vCPUs of this VM sit on cores that share a last-level cache on the
   host (tens of ns) or not (hundreds): lscpu inside the VM shows one L3 either way, and the
   host moves the vCPUs. bench/serve/common.py compiles it once into bench/out/. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <time.h>

static int ROUNDS = 200000;  /* or argv[1] */
static _Alignas(64) atomic_int flag;

static void pin(int cpu) {
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    pthread_setaffinity_np(pthread_self(), sizeof s, &s);
}

static void *pong(void *arg) {
    (void)arg;
    pin(1);
    for (int i = 0; i < ROUNDS; i++) {
        while (atomic_load(&flag) != 1) {}
        atomic_store(&flag, 0);
    }
    return NULL;
}

int main(int argc, char **argv) {
    pthread_t t;
    struct timespec a, b;
    if (argc > 1)
        sscanf(argv[1], "%d", &ROUNDS);
    pthread_create(&t, NULL, pong, NULL);
    pin(0);
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < ROUNDS; i++) {
        atomic_store(&flag, 1);
        while (atomic_load(&flag) != 0) {}
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    pthread_join(t, NULL);
    printf("%.0f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / ROUNDS);
    return 0;
}
