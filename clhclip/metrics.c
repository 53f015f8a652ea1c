/* Semantic segmentation metrics with detectron2 SemSegEvaluator semantics: a confusion
 * matrix over n classes with ignored ground truth dropped; IoU and accuracy per class
 * (NaN without ground truth), their means over classes with ground truth, frequency
 * weighted IoU and pixel accuracy. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "data.h"
#include "internal.h"

#define VOC20B_BACKGROUND 20

struct clh_confusion {
    int n;
    int voc20b;
    uint64_t *counts; /* [pred * n + gt] */
};

clh_status clh_confusion_new(int n_classes, const clh_confusion_options *opt, clh_confusion **out) {
    if (!out)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_confusion_new: out is NULL");
    *out = NULL;
    if (n_classes <= 0 || n_classes > 65536)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_confusion_new: class count must be 1..65536, got %d", n_classes);
    int voc20b = opt && opt->voc20b_background;
    if (voc20b && n_classes <= VOC20B_BACKGROUND)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_confusion_new: voc20b needs at least 21 classes, got %d", n_classes);
    clh_confusion *c = calloc(1, sizeof *c);
    if (c)
        c->counts = calloc((size_t)n_classes * (size_t)n_classes, sizeof *c->counts);
    if (!c || !c->counts) {
        free(c);
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "clh_confusion_new: out of host memory");
    }
    c->n = n_classes;
    c->voc20b = voc20b;
    *out = c;
    return CLH_OK;
}

void clh_confusion_free(clh_confusion *c) {
    if (!c)
        return;
    free(c->counts);
    free(c);
}

int clh_confusion_classes(const clh_confusion *c) {
    return c ? c->n : 0;
}

uint64_t clh_confusion_count(const clh_confusion *c, int pred, int gt) {
    if (!c || pred < 0 || gt < 0 || pred >= c->n || gt >= c->n)
        return 0;
    return c->counts[(size_t)pred * c->n + gt];
}

static int32_t remap_pred(const clh_confusion *c, int32_t p) {
    return c->voc20b && p >= VOC20B_BACKGROUND ? VOC20B_BACKGROUND : p;
}

/* Validate everything first so a bad input leaves the matrix untouched. */
static clh_status check_values(const clh_confusion *c, const int32_t *pred, const int32_t *gt,
                               size_t p) {
    for (size_t i = 0; i < p; i++) {
        if (gt[i] == CLH_LABEL_IGNORE)
            continue;
        if (gt[i] < 0 || gt[i] >= c->n)
            return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                            "clh_confusion_add: ground truth %d at pixel %zu is outside 0..%d "
                            "and not the ignore value %d",
                            gt[i], i, c->n - 1, CLH_LABEL_IGNORE);
        int32_t q = remap_pred(c, pred[i]);
        if (q < 0 || q >= c->n)
            return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                            "clh_confusion_add: prediction %d at pixel %zu is outside 0..%d",
                            pred[i], i, c->n - 1);
    }
    return CLH_OK;
}

clh_status clh_confusion_add(clh_confusion *c, const int32_t *pred, const int32_t *gt, size_t p) {
    if (!c || (p && (!pred || !gt)))
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT,
                        "clh_confusion_add: confusion, pred and gt are required");
    CLH_TRY(check_values(c, pred, gt, p));
    for (size_t i = 0; i < p; i++)
        if (gt[i] != CLH_LABEL_IGNORE)
            c->counts[(size_t)remap_pred(c, pred[i]) * c->n + gt[i]]++;
    return CLH_OK;
}

clh_status clh_confusion_merge(clh_confusion *dst, const clh_confusion *src) {
    if (!dst || !src)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_confusion_merge: NULL confusion");
    if (dst->n != src->n)
        return clh_fail(NULL, CLH_ERR_SHAPE, "clh_confusion_merge: class counts differ (%d vs %d)",
                        dst->n, src->n);
    size_t nn = (size_t)dst->n * dst->n;
    for (size_t i = 0; i < nn; i++)
        dst->counts[i] += src->counts[i];
    return CLH_OK;
}

void clh_seg_metrics_free(clh_seg_metrics *m) {
    if (!m)
        return;
    free(m->iou);
    free(m->acc);
    memset(m, 0, sizeof *m);
}

clh_status clh_confusion_results(const clh_confusion *c, clh_seg_metrics *out) {
    if (!out)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_confusion_results: out is NULL");
    memset(out, 0, sizeof *out);
    if (!c)
        return clh_fail(NULL, CLH_ERR_INVALID_ARGUMENT, "clh_confusion_results: confusion is NULL");
    int n = c->n;
    out->n = n;
    out->iou = malloc((size_t)n * sizeof *out->iou);
    out->acc = malloc((size_t)n * sizeof *out->acc);
    if (!out->iou || !out->acc) {
        clh_seg_metrics_free(out);
        return clh_fail(NULL, CLH_ERR_OUT_OF_MEMORY, "clh_confusion_results: out of host memory");
    }
    uint64_t total = 0, correct = 0;
    for (int k = 0; k < n * n; k++)
        total += c->counts[k];
    double iou_sum = 0, acc_sum = 0, fw = 0;
    int iou_valid = 0, acc_valid = 0;
    for (int k = 0; k < n; k++) {
        uint64_t tp = c->counts[(size_t)k * n + k], pos_gt = 0, pos_pred = 0;
        for (int j = 0; j < n; j++) {
            pos_gt += c->counts[(size_t)j * n + k];
            pos_pred += c->counts[(size_t)k * n + j];
        }
        correct += tp;
        uint64_t uni = pos_gt + pos_pred - tp;
        out->acc[k] = pos_gt ? (double)tp / (double)pos_gt : NAN;
        out->iou[k] = pos_gt && uni ? (double)tp / (double)uni : NAN;
        if (pos_gt) {
            acc_sum += out->acc[k];
            acc_valid++;
        }
        if (pos_gt && uni) {
            iou_sum += out->iou[k];
            iou_valid++;
            fw += out->iou[k] * (double)pos_gt / (double)total;
        }
    }
    out->pixels = total;
    out->macc = acc_valid ? acc_sum / acc_valid : NAN;
    out->miou = iou_valid ? iou_sum / iou_valid : NAN;
    out->fwiou = total ? fw : NAN;
    out->pacc = total ? (double)correct / (double)total : NAN;
    return CLH_OK;
}
