/* Segmentation metrics (detectron2 SemSegEvaluator semantics) on hand-made predictions
 * with IoUs worked out by hand, an independent per-class set count on random maps, the
 * VOC-20b remap, merging and the error paths. */
#include "testutil.h"

#include "data.h"

#define EPS 1e-12

static void perfect_prediction(void **state) {
    (void)state;
    int32_t gt[6] = {0, 1, 2, 2, CLH_LABEL_IGNORE, 1};
    int32_t pred[6] = {0, 1, 2, 2, 0, 1}; /* a wrong guess on an ignored pixel is free */
    clh_confusion *c;
    TU_OK(clh_confusion_new(4, NULL, &c));
    TU_OK(clh_confusion_add(c, pred, gt, 6));
    clh_seg_metrics m;
    TU_OK(clh_confusion_results(c, &m));
    assert_true(fabs(m.miou - 1) < EPS && fabs(m.pacc - 1) < EPS && fabs(m.macc - 1) < EPS &&
                fabs(m.fwiou - 1) < EPS);
    assert_int_equal(m.pixels, 5);
    assert_true(isnan(m.iou[3]) && isnan(m.acc[3])); /* class 3 has no ground truth */
    clh_seg_metrics_free(&m);
    clh_confusion_free(c);
}

/* 4x4 ground truth: columns 0-1 class 0, columns 2-3 class 1. The prediction moves the
 * boundary one column left and puts class 2 (absent from GT) on one class-1 pixel.
 * class 0: TP 4, GT 8, pred 4 -> IoU 4/8, acc 4/8
 * class 1: TP 7, GT 8, pred 11 -> IoU 7/12, acc 7/8
 * class 2: no GT -> NaN (its wrong pixel still costs class 1)
 * mIoU (1/2 + 7/12)/2, mAcc (1/2 + 7/8)/2, pAcc 11/16, fwIoU 1/2 * 1/2 + 1/2 * 7/12. */
static void shifted_boundary_by_hand(void **state) {
    (void)state;
    int32_t gt[16], pred[16];
    for (int y = 0; y < 4; y++)
        for (int x = 0; x < 4; x++) {
            gt[y * 4 + x] = x < 2 ? 0 : 1;
            pred[y * 4 + x] = x < 1 ? 0 : 1;
        }
    pred[15] = 2;
    clh_confusion *c;
    TU_OK(clh_confusion_new(3, NULL, &c));
    TU_OK(clh_confusion_add(c, pred, gt, 16));
    assert_int_equal(clh_confusion_count(c, 1, 0), 4);
    assert_int_equal(clh_confusion_count(c, 2, 1), 1);
    clh_seg_metrics m;
    TU_OK(clh_confusion_results(c, &m));
    assert_true(fabs(m.iou[0] - 0.5) < EPS);
    assert_true(fabs(m.iou[1] - 7.0 / 12) < EPS);
    assert_true(isnan(m.iou[2]) && isnan(m.acc[2]));
    assert_true(fabs(m.acc[0] - 0.5) < EPS && fabs(m.acc[1] - 7.0 / 8) < EPS);
    assert_true(fabs(m.miou - (0.5 + 7.0 / 12) / 2) < EPS);
    assert_true(fabs(m.macc - (0.5 + 7.0 / 8) / 2) < EPS);
    assert_true(fabs(m.pacc - 11.0 / 16) < EPS);
    assert_true(fabs(m.fwiou - (0.25 + 0.5 * 7.0 / 12)) < EPS);
    clh_seg_metrics_free(&m);
    clh_confusion_free(c);
}

/* Per-class intersection and union counted directly from the maps (no matrix), with
 * random predictions, several add() calls and a merge of two halves. */
static void random_maps_match_direct_count_and_merge(void **state) {
    (void)state;
    enum { N = 5, P = 4000 };
    int32_t gt[P], pred[P];
    uint64_t s = 12345;
    for (int i = 0; i < P; i++) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        int g = (int)((s >> 33) % 7); /* 5, 6 -> ignore; class 4 never in GT */
        gt[i] = g >= 4 ? CLH_LABEL_IGNORE : g;
        int r = (int)((s >> 20) % 3);
        pred[i] = r == 0 ? (int)((s >> 40) % N) : (gt[i] == CLH_LABEL_IGNORE ? 4 : gt[i]);
    }
    clh_confusion *all, *a, *b;
    TU_OK(clh_confusion_new(N, NULL, &all));
    TU_OK(clh_confusion_new(N, NULL, &a));
    TU_OK(clh_confusion_new(N, NULL, &b));
    TU_OK(clh_confusion_add(all, pred, gt, P));
    TU_OK(clh_confusion_add(a, pred, gt, 1000));
    TU_OK(clh_confusion_add(b, pred + 1000, gt + 1000, 1500));
    TU_OK(clh_confusion_add(b, pred + 2500, gt + 2500, P - 2500));
    TU_OK(clh_confusion_merge(a, b));
    clh_seg_metrics m, mm;
    TU_OK(clh_confusion_results(all, &m));
    TU_OK(clh_confusion_results(a, &mm));
    double iou_sum = 0;
    int valid = 0;
    long correct = 0, counted = 0;
    for (int k = 0; k < N; k++) {
        long inter = 0, uni = 0, gtk = 0;
        for (int i = 0; i < P; i++) {
            if (gt[i] == CLH_LABEL_IGNORE)
                continue;
            inter += gt[i] == k && pred[i] == k;
            uni += gt[i] == k || pred[i] == k;
            gtk += gt[i] == k;
        }
        if (gtk) {
            assert_true(fabs(m.iou[k] - (double)inter / uni) < EPS);
            iou_sum += (double)inter / uni;
            valid++;
        } else {
            assert_true(isnan(m.iou[k]));
        }
        assert_true(mm.iou[k] == m.iou[k] || (isnan(mm.iou[k]) && isnan(m.iou[k])));
    }
    for (int i = 0; i < P; i++)
        if (gt[i] != CLH_LABEL_IGNORE) {
            counted++;
            correct += pred[i] == gt[i];
        }
    assert_int_equal(valid, 4);
    assert_true(fabs(m.miou - iou_sum / valid) < EPS);
    assert_true(fabs(m.pacc - (double)correct / counted) < EPS);
    assert_true(m.miou == mm.miou && m.pacc == mm.pacc && m.fwiou == mm.fwiou);
    assert_int_equal(m.pixels, (uint64_t)counted);
    clh_seg_metrics_free(&m);
    clh_seg_metrics_free(&mm);
    clh_confusion_free(all);
    clh_confusion_free(a);
    clh_confusion_free(b);
}

static void voc20b_maps_extra_names_to_background(void **state) {
    (void)state;
    /* 59 names (PAS-20b vocabulary): 20 VOC classes, then context names; GT is VOC-20b. */
    int32_t gt[4] = {20, 20, 3, 20}, pred[4] = {35, 20, 3, 58};
    clh_confusion *c, *plain;
    clh_confusion_options o = {1};
    TU_OK(clh_confusion_new(59, &o, &c));
    TU_OK(clh_confusion_add(c, pred, gt, 4));
    assert_int_equal(clh_confusion_count(c, 20, 20), 3);
    clh_seg_metrics m;
    TU_OK(clh_confusion_results(c, &m));
    assert_true(fabs(m.miou - 1) < EPS);
    clh_seg_metrics_free(&m);
    /* without the remap the context names count as errors */
    TU_OK(clh_confusion_new(59, NULL, &plain));
    TU_OK(clh_confusion_add(plain, pred, gt, 4));
    TU_OK(clh_confusion_results(plain, &m));
    assert_true(fabs(m.iou[20] - 1.0 / 3) < EPS);
    clh_seg_metrics_free(&m);
    clh_confusion_free(c);
    clh_confusion_free(plain);
    TU_FAILS(clh_confusion_new(20, &o, &c), CLH_ERR_INVALID_ARGUMENT, "at least 21");
}

static void bad_values_are_errors_and_count_nothing(void **state) {
    (void)state;
    clh_confusion *c, *d;
    TU_OK(clh_confusion_new(3, NULL, &c));
    int32_t gt[3] = {0, 1, 7}, pred[3] = {0, 1, 1};
    TU_FAILS(clh_confusion_add(c, pred, gt, 3), CLH_ERR_INVALID_ARGUMENT, "ground truth 7");
    int32_t gt2[3] = {0, 1, 2}, pred2[3] = {0, -1, 1};
    TU_FAILS(clh_confusion_add(c, pred2, gt2, 3), CLH_ERR_INVALID_ARGUMENT, "prediction -1");
    pred2[1] = 3;
    TU_FAILS(clh_confusion_add(c, pred2, gt2, 3), CLH_ERR_INVALID_ARGUMENT, "prediction 3");
    int32_t gt3[1] = {-2}, pred3[1] = {0};
    TU_FAILS(clh_confusion_add(c, pred3, gt3, 1), CLH_ERR_INVALID_ARGUMENT, "ground truth -2");
    clh_seg_metrics m;
    TU_OK(clh_confusion_results(c, &m));
    assert_int_equal(m.pixels, 0);
    assert_true(isnan(m.miou) && isnan(m.pacc));
    clh_seg_metrics_free(&m);
    TU_FAILS(clh_confusion_new(0, NULL, &d), CLH_ERR_INVALID_ARGUMENT, "class count");
    TU_OK(clh_confusion_new(4, NULL, &d));
    TU_FAILS(clh_confusion_merge(c, d), CLH_ERR_SHAPE, "3 vs 4");
    TU_FAILS(clh_confusion_add(c, NULL, gt, 3), CLH_ERR_INVALID_ARGUMENT, "required");
    clh_confusion_free(c);
    clh_confusion_free(d);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(perfect_prediction),
        cmocka_unit_test(shifted_boundary_by_hand),
        cmocka_unit_test(random_maps_match_direct_count_and_merge),
        cmocka_unit_test(voc20b_maps_extra_names_to_background),
        cmocka_unit_test(bad_values_are_errors_and_count_nothing),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
