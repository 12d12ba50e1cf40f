"""Prediction fixtures for `--compat medrega` (issue #15), with the values the original scorers give on them, worked
out by hand from the original code's rules (src/eval of xmed-lab/MedRegA). Every file is in the original formats
(VQA: pred_answer/gt_answer; Text-to-Region: answer/gt/hw). Float32 values are the float32 results of the original's
arithmetic (written out, see the comments); everything else is exact."""
from __future__ import annotations

HW = [480, 640]  # [height, width] of every Text-to-Region fixture image

# ------------------------------------------------------------------------------------------------------- VQA EN
VQA_EN = [
    {"question_id": 0, "pred_answer": "yes", "gt_answer": "No "},  # cleaned "no " is not "no": open, recall 0
    {"question_id": 1, "pred_answer": "no", "gt_answer": "no"},  # closed, right
    {"question_id": 2, "pred_answer": "Yes.", "gt_answer": "yes"},  # "Yes." -> token "yes,": closed, wrong
    {"question_id": 3, "pred_answer": "left lung", "gt_answer": "Left lung"},  # open, recall 1
    {"question_id": 4, "pred_answer": "the pa view", "gt_answer": "PA"},  # pa -> posterior anterior: recall 1, P 1/2
    {"question_id": 5, "pred_answer": "brain", "gt_answer": "head"},  # head -> brain: recall 1
]
_F1_1 = 2 / (2 + 1e-8)
VQA_EN_EXPECTED = {
    "closed_accuracy": 1 / 2,  # questions 1 (right) and 2 (wrong); joining tokens first made 0 closed too (1/3)
    "open_recall": 3 / 4,  # questions 0, 3, 4, 5
    "open_accuracy": 3 / 4,
    "recall": 4 / 6,
    "token_f1": (0 + _F1_1 + 0 + _F1_1 + 2 * 0.5 / (1.5 + 1e-8) + _F1_1) / 6,
    "bleu1": (0 + 1 + 0 + 1 + 0.5 + 1) / 6,  # "the posterior anterior view" vs "posterior anterior": 2/4, no penalty
}
VQA_EN_CLOSED_ONLY = [{"question_id": 0, "pred_answer": "yes", "gt_answer": "yes"},
                      {"question_id": 1, "pred_answer": "yes", "gt_answer": "no"}]

# ------------------------------------------------------------------------------------------------------- VQA ZH
# ASCII answers in a Chinese split: the Chinese rules must apply to every record (file name slake_zh_...).
VQA_ZH = [
    {"question_id": 0, "pred_answer": "CT", "gt_answer": "CT"},  # open, recall 1
    {"question_id": 1, "pred_answer": "yes", "gt_answer": "no"},  # closed (by the prediction): {"no","not"}, 0 -> wrong
    {"question_id": 2, "pred_answer": "no", "gt_answer": "no"},  # closed: recall 1/2 against {"no","not"} >= 0.4
    {"question_id": 3, "pred_answer": "肝脏", "gt_answer": "肝脏"},  # open, recall 1
]
VQA_ZH_EXPECTED = {"closed_accuracy": 1 / 2, "open_recall": 1.0, "open_accuracy": 1.0, "recall": 3 / 4}


# --------------------------------------------------------------------------------------------- Text-to-Region
def ref(*objects: tuple[str, str]) -> str:
    return ", ".join(f"<ref>{name}</ref><box>{boxes}</box>" for name, boxes in objects)


SS = [
    # spacing the original's grammar refuses: no box, IoU 0 (the tolerant grammar would read IoU 1)
    {"question_id": 0, "answer": "liver[[ 350, 380, 720, 800 ]]", "gt": ref(("liver", "[[350, 380, 720, 800]]"))},
    {"question_id": 1, "answer": "liver[[350 ,380 ,720 ,800]]", "gt": ref(("liver", "[[350, 380, 720, 800]]"))},
    # float32 IoU 0.5000000596046448 (> 0.5); float64 gives 0.49999999999999994
    {"question_id": 2, "answer": "liver[[0, 0, 199, 865]]", "gt": ref(("liver", "[[0, 0, 398, 865]]"))},
    # float32 IoU exactly 0.25 (not > 0.25); float64 gives 0.25000000000000006
    {"question_id": 3, "answer": "liver[[0, 0, 235, 443]]", "gt": ref(("liver", "[[0, 0, 940, 443]]"))},
    # boxes the original's literal_eval cannot read: one box [0, 0, 0, 0], IoU 0
    {"question_id": 4, "answer": "liver[[01, 2, 30, 40]]", "gt": ref(("liver", "[[0, 0, 100, 100]]"))},
    {"question_id": 5, "answer": "liver[[５,10,100,200]]", "gt": ref(("liver", "[[5, 10, 100, 200]]"))},
    # tagged answer: tags removed; 2 predictions > 1 reference -> the best IoU (1.0)
    {"question_id": 6, "answer": ref(("liver", "[[0, 0, 100, 50]]"), ("liver", "[[0, 0, 100, 100]]")),
     "gt": ref(("liver", "[[0, 0, 100, 100]]"))},
]
SS_IOUS = [0.0, 0.0, 0.5000000596046448, 0.25, 0.0, 0.0, 1.0]
SS_EXPECTED_STRINGS = {"acc25": "0.2857", "acc50": "0.2857", "acc75": "0.1429", "iou": "0.2500"}

SM = [
    # float32 IoU 0.7499998807907104 (< 0.75, not matched; float64 0.7500000000000001 would match) and 1.0
    {"question_id": 0, "answer": "a[[0, 0, 207, 170]], b[[500, 500, 600, 600]]",
     "gt": ref(("a", "[[0, 0, 276, 170]]"), ("b", "[[500, 500, 600, 600]]"))},
    {"question_id": 1, "answer": "I cannot find them.", "gt": ref(("a", "[[0, 0, 276, 170]]"))},  # no pair at all
]
SM_EXPECTED = {"precision": (1 / 2 + 0) / 2, "recall": (1 / 2 + 0) / 2, "f1": (0.5 + 0) / 2,
               "iou": (0.7499998807907104 + 1.0) / 2}

MS = [
    # decoded names "liver" and ", kidney" (the text between "]" and "[["): ", kidney" vs "left kidney" disagree
    {"question_id": 0, "answer": ref(("liver", "[[0, 0, 100, 100]]"), ("kidney", "[[200, 0, 300, 100]]")),
     "gt": ref(("liver", "[[0, 0, 100, 100]]"), ("left kidney", "[[200, 0, 300, 100]]"))},
    # an unnamed first box agrees with any name
    {"question_id": 1, "answer": "[[0, 0, 100, 100]]", "gt": ref(("liver", "[[0, 0, 100, 100]]"))},
]
MS_EXPECTED = {"box_acc": 1.0, "box_iou": 1.0, "object_acc": (1 / 2 + 1) / 2,
               "object_iou": (2.0 + 1.0) / (1 + 1),  # ms sums the IoU of every looked-up pair, agreeing or not
               "object_box_acc": 0.75, "object_box_alignment": 0.75, "object_box_detection": 1.0}

MM = [
    {"question_id": 0, "answer": "liver[[0, 0, 100, 100], [0, 0, 50, 50]], kidney[[200, 0, 300, 100]]",
     "gt": ref(("liver", "[[0, 0, 100, 100]]"), ("left kidney", "[[200, 0, 300, 100]]"))},
    {"question_id": 1, "answer": "spleen[[500, 500, 600, 600]]", "gt": ref(("spleen", "[[500, 500, 600, 600]]"))},
]
MM_EXPECTED = {"box_pre": 1.0, "box_recall": (2 / 3 + 1) / 2, "box_f1": (0.8 + 1) / 2, "box_iou": 1.0,
               "object_pre": 0.75, "object_rec": (1 / 3 + 1) / 2, "object_f1": (0.4 + 1) / 2, "object_iou": 1.0,
               "object_box_pre": 0.75, "object_box_recall": (1 / 3 + 1) / 2, "object_box_f1": (0.4 + 1) / 2,
               "object_box_alignment": 0.75, "object_box_detection": 1.0}
# the second box list cannot be read: its [0, 0, 0, 0] box has no name and gets a Hungarian pair -> KeyError
MM_CRASH = [{"question_id": 0, "answer": "liver[[0, 0, 100, 100]], kidney[[01, 0, 300, 100]]", "gt": MM[0]["gt"]}]

# two answer files whose ids both restart at 0: the original pools all four samples
POOL_A = [{"question_id": 0, "answer": "liver[[0, 0, 100, 100]]", "gt": ref(("liver", "[[0, 0, 100, 100]]"))},
          {"question_id": 1, "answer": "no box", "gt": ref(("liver", "[[0, 0, 100, 100]]"))}]
POOL_B = [{"question_id": 0, "answer": "liver[[0, 0, 100, 100]]", "gt": ref(("liver", "[[0, 0, 100, 100]]"))},
          {"question_id": 1, "answer": "liver[[0, 0, 100, 100]]", "gt": ref(("liver", "[[0, 0, 100, 100]]"))}]

T2R = {"ss": SS, "sm": SM, "ms": MS, "mm": MM}
for _rows in (SS, SM, MS, MM, MM_CRASH, POOL_A, POOL_B):
    for _r in _rows:
        _r["hw"] = HW
