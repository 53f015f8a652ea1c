/* Prefetching batch loader: worker threads prepare the samples of the next `prefetch`
 * batches; every sample's content depends only on (seed, epoch, dataset index), so the
 * batch sequence is the same for any thread count or timing. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "data.h"
#include "hclip.h"
#include "internal.h"

#define DEFAULT_PREFETCH 2
#define MAX_AUTO_THREADS 8
#define MESSAGE_SIZE     1024

/* Domain tags so that shuffles and per-sample augmentation draw independent streams. */
#define TAG_SHUFFLE 0x53485546464c45ULL
#define TAG_SAMPLE  0x53414d504c45ULL

/* One batch being prepared. Its buffers move to the clh_batch handed to the caller. */
typedef struct slot {
    int64_t step; /* -1 = free */
    int size;
    int assigned; /* samples handed to workers */
    int done;     /* samples finished */
    clh_batch *batch;
    clh_status status;
    int error_j; /* sample position of the recorded failure */
    char message[MESSAGE_SIZE];
} slot;

struct clh_loader {
    const clh_dataset *ds;
    clh_loader_options opt;
    size_t n;
    int64_t steps_per_epoch;
    int threads;
    pthread_t *workers;
    int started;

    pthread_mutex_t lock;
    pthread_cond_t work;  /* workers: a job may be available */
    pthread_cond_t ready; /* consumer/seek: a sample finished */
    int stopping;
    int paused;        /* seek in progress: no new jobs */
    int in_flight;     /* samples being computed right now */
    int64_t next_step; /* step the consumer gets next */
    int64_t fill_step; /* step whose samples are being assigned */
    slot *slots;       /* prefetch slots, step s lives in slots[s % prefetch] */

    /* Shuffled order of one epoch, cached (guarded by lock). */
    int64_t order_epoch;
    size_t *order;
};

static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static uint64_t derive_seed(uint64_t seed, uint64_t tag, uint64_t a, uint64_t b) {
    return mix64(mix64(mix64(seed ^ tag) + a) + b);
}

/* Dataset order of epoch e (Fisher-Yates from (seed, e), or identity). */
static void epoch_order(const clh_loader *ld, int64_t epoch, size_t *order) {
    for (size_t i = 0; i < ld->n; i++)
        order[i] = i;
    if (!ld->opt.shuffle)
        return;
    clh_rng rng;
    clh_rng_seed(&rng, derive_seed(ld->opt.seed, TAG_SHUFFLE, (uint64_t)epoch, 0));
    for (size_t i = ld->n - 1; i > 0; i--) {
        size_t j = (size_t)(clh_rng_uniform(&rng) * (double)(i + 1));
        if (j > i)
            j = i;
        size_t t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
}

static int batch_size_of(const clh_loader *ld, int64_t step) {
    int64_t b = step % ld->steps_per_epoch;
    size_t first = (size_t)b * (size_t)ld->opt.batch;
    size_t left = ld->n - first;
    return left < (size_t)ld->opt.batch ? (int)left : ld->opt.batch;
}

void clh_batch_free(clh_batch *batch) {
    if (!batch)
        return;
    free(batch->pixels);
    free(batch->labels);
    free(batch->indices);
    free(batch);
}

static clh_batch *batch_alloc(int size, int crop) {
    clh_batch *b = calloc(1, sizeof *b);
    if (!b)
        return NULL;
    size_t plane = (size_t)crop * crop;
    b->size = size;
    b->crop = crop;
    b->pixels = malloc((size_t)size * 3 * plane * sizeof *b->pixels);
    b->labels = malloc((size_t)size * plane * sizeof *b->labels);
    b->indices = calloc((size_t)size, sizeof *b->indices);
    if (!b->pixels || !b->labels || !b->indices) {
        clh_batch_free(b);
        return NULL;
    }
    return b;
}

static void slot_reset(slot *s) {
    clh_batch_free(s->batch);
    memset(s, 0, sizeof *s);
    s->step = -1;
}

/* Under lock: prepare the slot of fill_step when it is free. Returns 0 when the step is
 * beyond the prefetch window. */
static int open_fill_slot(clh_loader *ld) {
    if (ld->fill_step >= ld->next_step + ld->opt.prefetch)
        return 0;
    slot *s = &ld->slots[ld->fill_step % ld->opt.prefetch];
    if (s->step == ld->fill_step)
        return 1;
    if (s->step >= 0) /* still holds an older, unconsumed step: cannot happen in window */
        return 0;
    s->step = ld->fill_step;
    s->size = batch_size_of(ld, ld->fill_step);
    s->batch = batch_alloc(s->size, ld->opt.crop);
    if (!s->batch) {
        s->status = CLH_ERR_OUT_OF_MEMORY;
        snprintf(s->message, sizeof s->message, "loader: out of host memory for a batch");
        s->assigned = s->done = s->size;
        ld->fill_step++;
        pthread_cond_broadcast(&ld->ready);
        return open_fill_slot(ld);
    }
    s->batch->step = ld->fill_step;
    s->batch->epoch = ld->fill_step / ld->steps_per_epoch;
    return 1;
}

/* Under lock: dataset index of sample j of step s (refreshes the cached epoch order). */
static size_t sample_index(clh_loader *ld, int64_t step, int j) {
    int64_t epoch = step / ld->steps_per_epoch;
    if (epoch != ld->order_epoch) {
        epoch_order(ld, epoch, ld->order);
        ld->order_epoch = epoch;
    }
    size_t pos = (size_t)(step % ld->steps_per_epoch) * (size_t)ld->opt.batch + (size_t)j;
    return ld->order[pos];
}

typedef struct job {
    slot *s;
    int64_t step;
    int j;
    size_t index;
} job;

/* Under lock: take the next sample to prepare, or return 0. */
static int take_job(clh_loader *ld, job *jb) {
    if (ld->stopping || ld->paused || !open_fill_slot(ld))
        return 0;
    slot *s = &ld->slots[ld->fill_step % ld->opt.prefetch];
    jb->s = s;
    jb->step = s->step;
    jb->j = s->assigned++;
    jb->index = sample_index(ld, s->step, jb->j);
    if (s->assigned == s->size)
        ld->fill_step++;
    return 1;
}

/* Read and augment one sample into its place in the batch (no lock held). */
static clh_status run_job(const clh_loader *ld, const job *jb, clh_batch *b) {
    clh_rgb8 img;
    clh_label_map lab;
    CLH_TRY(clh_dataset_read_rgb8(ld->ds, jb->index, &img, &lab));
    clh_augment_options aug = {ld->opt.crop, ld->opt.max_size, ld->opt.augment};
    size_t plane = (size_t)ld->opt.crop * ld->opt.crop;
    uint64_t seed = derive_seed(ld->opt.seed, TAG_SAMPLE, (uint64_t)b->epoch, jb->index);
    clh_status st =
        clh_augment_sample(&img, &lab, &aug, seed, b->pixels + (size_t)jb->j * 3 * plane,
                           b->labels + (size_t)jb->j * plane);
    clh_rgb8_free(&img);
    clh_label_map_free(&lab);
    return st;
}

static void *worker_main(void *arg) {
    clh_loader *ld = arg;
    pthread_mutex_lock(&ld->lock);
    while (!ld->stopping) {
        job jb;
        if (!take_job(ld, &jb)) {
            pthread_cond_wait(&ld->work, &ld->lock);
            continue;
        }
        ld->in_flight++;
        clh_batch *b = jb.s->batch;
        b->indices[jb.j] = jb.index;
        pthread_mutex_unlock(&ld->lock);
        clh_status st = run_job(ld, &jb, b);
        pthread_mutex_lock(&ld->lock);
        ld->in_flight--;
        /* Keep the failure of the lowest sample position, whichever thread saw it first. */
        if (st != CLH_OK && (jb.s->status == CLH_OK || jb.j < jb.s->error_j)) {
            jb.s->status = st;
            jb.s->error_j = jb.j;
            snprintf(jb.s->message, sizeof jb.s->message, "%s", clh_last_error());
        }
        jb.s->done++;
        pthread_cond_broadcast(&ld->ready);
    }
    pthread_mutex_unlock(&ld->lock);
    return NULL;
}

static clh_status check_loader_options(const clh_dataset *ds, const clh_loader_options *opt) {
    if (!ds || !opt)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_loader_new: dataset and options "
                        "are required");
    if (opt->batch <= 0 || opt->crop <= 0 || opt->crop > 8192 || opt->threads < 0 ||
        opt->threads > 256 || opt->prefetch < 0 || opt->prefetch > 1024 || opt->max_size < 0)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_loader_new: need batch > 0 (got %d), crop 1..8192 (got %d), threads "
                        "0..256 (got %d), prefetch 0..1024 (got %d), max_size >= 0",
                        opt->batch, opt->crop, opt->threads, opt->prefetch);
    size_t n = clh_dataset_count(ds);
    if (n == 0 || (opt->drop_last && n < (size_t)opt->batch))
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_loader_new: %zu samples do not fill one batch of %d (drop_last)", n,
                        opt->batch);
    return CLH_OK;
}

static int auto_threads(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > MAX_AUTO_THREADS ? MAX_AUTO_THREADS : (int)n;
}

static void stop_workers(clh_loader *ld) {
    pthread_mutex_lock(&ld->lock);
    ld->stopping = 1;
    pthread_cond_broadcast(&ld->work);
    pthread_mutex_unlock(&ld->lock);
    for (int i = 0; i < ld->started; i++)
        pthread_join(ld->workers[i], NULL);
    ld->started = 0;
}

void clh_loader_free(clh_loader *ld) {
    if (!ld)
        return;
    stop_workers(ld);
    if (ld->slots)
        for (int i = 0; i < ld->opt.prefetch; i++)
            slot_reset(&ld->slots[i]);
    pthread_cond_destroy(&ld->work);
    pthread_cond_destroy(&ld->ready);
    pthread_mutex_destroy(&ld->lock);
    free(ld->slots);
    free(ld->order);
    free(ld->workers);
    free(ld);
}

clh_status clh_loader_new(const clh_dataset *ds, const clh_loader_options *opt, clh_loader **out) {
    if (!out)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_loader_new: out is NULL");
    *out = NULL;
    CLH_TRY(check_loader_options(ds, opt));
    clh_loader *ld = calloc(1, sizeof *ld);
    if (!ld)
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "clh_loader_new: out of host memory");
    ld->ds = ds;
    ld->opt = *opt;
    ld->n = clh_dataset_count(ds);
    ld->opt.prefetch = opt->prefetch ? opt->prefetch : DEFAULT_PREFETCH;
    ld->threads = opt->threads ? opt->threads : auto_threads();
    ld->steps_per_epoch =
        (int64_t)(opt->drop_last ? ld->n / (size_t)opt->batch
                                 : (ld->n + (size_t)opt->batch - 1) / (size_t)opt->batch);
    ld->order_epoch = -1;
    pthread_mutex_init(&ld->lock, NULL);
    pthread_cond_init(&ld->work, NULL);
    pthread_cond_init(&ld->ready, NULL);
    ld->slots = calloc((size_t)ld->opt.prefetch, sizeof *ld->slots);
    ld->order = malloc(ld->n * sizeof *ld->order);
    ld->workers = calloc((size_t)ld->threads, sizeof *ld->workers);
    if (!ld->slots || !ld->order || !ld->workers) {
        clh_loader_free(ld);
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "clh_loader_new: out of host memory");
    }
    for (int i = 0; i < ld->opt.prefetch; i++)
        slot_reset(&ld->slots[i]);
    for (; ld->started < ld->threads; ld->started++)
        if (pthread_create(&ld->workers[ld->started], NULL, worker_main, ld) != 0) {
            clh_loader_free(ld);
            return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "clh_loader_new: cannot start threads");
        }
    *out = ld;
    return CLH_OK;
}

int64_t clh_loader_steps_per_epoch(const clh_loader *ld) {
    return ld ? ld->steps_per_epoch : 0;
}

clh_status clh_loader_next(clh_loader *ld, clh_batch **out) {
    if (!out)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_loader_next: out is NULL");
    *out = NULL;
    if (!ld)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_loader_next: loader is NULL");
    pthread_mutex_lock(&ld->lock);
    slot *s = &ld->slots[ld->next_step % ld->opt.prefetch];
    pthread_cond_broadcast(&ld->work);
    while (!(s->step == ld->next_step && s->done == s->size))
        pthread_cond_wait(&ld->ready, &ld->lock);
    clh_batch *b = s->batch;
    clh_status st = s->status;
    char message[MESSAGE_SIZE];
    snprintf(message, sizeof message, "%s", s->message);
    s->batch = NULL;
    slot_reset(s);
    ld->next_step++;
    pthread_cond_broadcast(&ld->work);
    pthread_mutex_unlock(&ld->lock);
    if (st != CLH_OK) {
        clh_batch_free(b);
        return clh_fail(NULL, st, "loader step %lld: %s", (long long)(ld->next_step - 1), message);
    }
    *out = b;
    return CLH_OK;
}

clh_status clh_loader_seek(clh_loader *ld, int64_t step) {
    if (!ld || step < 0)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_loader_seek: need a loader and a "
                        "step >= 0");
    pthread_mutex_lock(&ld->lock);
    ld->paused = 1;
    while (ld->in_flight > 0)
        pthread_cond_wait(&ld->ready, &ld->lock);
    for (int i = 0; i < ld->opt.prefetch; i++)
        slot_reset(&ld->slots[i]);
    ld->next_step = ld->fill_step = step;
    ld->paused = 0;
    pthread_cond_broadcast(&ld->work);
    pthread_mutex_unlock(&ld->lock);
    return CLH_OK;
}
