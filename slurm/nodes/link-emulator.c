/* A user-space link emulator: netem's "delay D rate R" for kernels without netem.
 *
 *   link-emulator --rate BITS_PER_S --delay-ns NS [--max-seconds S] QUEUE...
 *
 * Each NFQUEUE number is one link (slurm/nodes/emulated-nodes.sh queues each node's
 * bridge port, in the switch namespace). Packets of a link leave in order: a packet
 * finishes "transmission" at max(arrival, previous finish) + wire_bits / rate and is
 * released (NF_ACCEPT) DELAY after that. Wire bytes count the Ethernet overhead
 * (header, FCS, preamble, gap: 38 bytes a frame) and, for a GSO super-packet, the headers
 * of every segment it stands for. Exits by itself after --max-seconds (default 86400).
 *
 * Build: gcc -O2 -o link-emulator link-emulator.c -lnetfilter_queue -lnfnetlink
 * (Debian: libnetfilter-queue-dev). Run it with real-time priority (chrt -f 10).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <linux/netfilter.h>
#include <libnetfilter_queue/libnetfilter_queue.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define LINK_LIMIT 64
#define QUEUE_CAPACITY 16384 /* packets held per link; the kernel queue is set to the same */
#define FRAME_OVERHEAD 38    /* Ethernet header 14 + FCS 4 + preamble 8 + inter-frame gap 12 */
#define TCP_IP_HEADERS 52    /* per extra segment of a GSO packet (IPv4 20 + TCP with timestamps 32) */
#define MTU 1500

struct held { uint32_t id; int64_t release_ns; };

struct link {
    struct nfq_q_handle *queue;
    int64_t busy_until_ns;  /* when the last packet finished its transmission */
    struct held packets[QUEUE_CAPACITY];
    unsigned head, count;
    uint64_t seen, late;
};

static struct link links[LINK_LIMIT];
static int link_count;
static double ns_per_bit;
static int64_t delay_ns;
static volatile sig_atomic_t stopping;

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static int64_t wire_bytes(const unsigned char *ip, int copied) {
    if (copied < 4) return 64 + FRAME_OVERHEAD;
    int64_t length = ntohs(*(const uint16_t *)(ip + 2)); /* IPv4 total length */
    if ((ip[0] >> 4) == 6) length += 40;                 /* IPv6: payload length + header */
    int64_t segments = length <= MTU ? 1 : (length - TCP_IP_HEADERS + (MTU - TCP_IP_HEADERS) - 1) / (MTU - TCP_IP_HEADERS);
    return length + (segments - 1) * TCP_IP_HEADERS + segments * FRAME_OVERHEAD;
}

static int on_packet(struct nfq_q_handle *queue, struct nfgenmsg *message, struct nfq_data *packet, void *data) {
    (void)message;
    struct link *link = data;
    struct nfqnl_msg_packet_hdr *header = nfq_get_msg_packet_hdr(packet);
    if (!header) return 0;
    uint32_t id = ntohl(header->packet_id);
    unsigned char *payload = NULL;
    int copied = nfq_get_payload(packet, &payload);
    if (link->count == QUEUE_CAPACITY) {  /* full: behave like a full switch buffer */
        return nfq_set_verdict(queue, id, NF_DROP, 0, NULL);
    }
    int64_t arrival = now_ns();
    int64_t start = arrival > link->busy_until_ns ? arrival : link->busy_until_ns;
    link->busy_until_ns = start + (int64_t)(wire_bytes(payload, copied) * 8 * ns_per_bit);
    struct held *slot = &link->packets[(link->head + link->count) % QUEUE_CAPACITY];
    slot->id = id;
    slot->release_ns = link->busy_until_ns + delay_ns;
    link->count++;
    link->seen++;
    return 0;
}

static int64_t release_due(int64_t now) {  /* accept every packet due by now; return the next due time or -1 */
    int64_t next = -1;
    for (int i = 0; i < link_count; i++) {
        struct link *link = &links[i];
        while (link->count > 0 && link->packets[link->head].release_ns <= now) {
            if (now - link->packets[link->head].release_ns > 1000000) link->late++;  /* over 1 ms late */
            nfq_set_verdict(link->queue, link->packets[link->head].id, NF_ACCEPT, 0, NULL);
            link->head = (link->head + 1) % QUEUE_CAPACITY;
            link->count--;
        }
        if (link->count > 0 && (next < 0 || link->packets[link->head].release_ns < next))
            next = link->packets[link->head].release_ns;
    }
    return next;
}

static void on_signal(int signal) { (void)signal; stopping = 1; }

static void usage(const char *program) {
    fprintf(stderr, "usage: %s --rate BITS_PER_S --delay-ns NS [--max-seconds S] QUEUE...\n", program);
    exit(2);
}

int main(int argc, char **argv) {
    double rate = 0;
    double max_seconds = 86400;
    int queue_numbers[LINK_LIMIT];
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--rate") && i + 1 < argc) rate = atof(argv[++i]);
        else if (!strcmp(argv[i], "--delay-ns") && i + 1 < argc) delay_ns = atoll(argv[++i]);
        else if (!strcmp(argv[i], "--max-seconds") && i + 1 < argc) max_seconds = atof(argv[++i]);
        else if (argv[i][0] != '-' && link_count < LINK_LIMIT) queue_numbers[link_count++] = atoi(argv[i]);
        else usage(argv[0]);
    }
    if (rate <= 0 || delay_ns < 0 || link_count == 0) usage(argv[0]);
    ns_per_bit = 1e9 / rate;

    struct nfq_handle *handle = nfq_open();
    if (!handle) { perror("nfq_open"); return 1; }
    nfnl_rcvbufsiz(nfq_nfnlh(handle), 16 * 1024 * 1024);
    for (int i = 0; i < link_count; i++) {
        links[i].queue = nfq_create_queue(handle, queue_numbers[i], on_packet, &links[i]);
        if (!links[i].queue) { fprintf(stderr, "cannot bind NFQUEUE %d\n", queue_numbers[i]); return 1; }
        nfq_set_mode(links[i].queue, NFQNL_COPY_PACKET, 8);  /* the IP header's length field is enough */
        nfq_set_queue_maxlen(links[i].queue, QUEUE_CAPACITY);
        nfq_set_queue_flags(links[i].queue, NFQA_CFG_F_GSO, NFQA_CFG_F_GSO);  /* no segmentation for us */
    }
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    fprintf(stderr, "link-emulator: %d links, rate %.0f bit/s, delay %" PRId64 " ns\n", link_count, rate, delay_ns);

    int fd = nfq_fd(handle);
    char buffer[65536 + 4096];
    int64_t deadline = now_ns() + (int64_t)(max_seconds * 1e9);
    while (!stopping && now_ns() < deadline) {
        int64_t next = release_due(now_ns());
        int64_t wait = next < 0 ? 100000000 : next - now_ns();  /* at most 100 ms, to see the deadline */
        if (wait < 0) wait = 0;
        struct timespec timeout = {wait / 1000000000, wait % 1000000000};
        struct pollfd poller = {fd, POLLIN, 0};
        int ready = ppoll(&poller, 1, &timeout, NULL);
        if (ready < 0 && errno != EINTR) { perror("ppoll"); break; }
        if (ready > 0) {
            for (int burst = 0; burst < 256; burst++) {  /* drain what is there, bounded */
                ssize_t got = recv(fd, buffer, sizeof buffer, MSG_DONTWAIT);
                if (got < 0) {
                    if (errno == ENOBUFS) { fprintf(stderr, "link-emulator: kernel dropped queue messages\n"); continue; }
                    break;
                }
                nfq_handle_packet(handle, buffer, (int)got);
                release_due(now_ns());
            }
        }
    }
    for (int i = 0; i < link_count; i++) {  /* let what is held go, then unbind */
        while (links[i].count > 0) {
            nfq_set_verdict(links[i].queue, links[i].packets[links[i].head].id, NF_ACCEPT, 0, NULL);
            links[i].head = (links[i].head + 1) % QUEUE_CAPACITY;
            links[i].count--;
        }
        fprintf(stderr, "link-emulator: queue %d: %" PRIu64 " packets, %" PRIu64 " released over 1 ms late\n",
                queue_numbers[i], links[i].seen, links[i].late);
        nfq_destroy_queue(links[i].queue);
    }
    nfq_close(handle);
    return 0;
}
