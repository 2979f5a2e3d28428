"""A registry knows its built-in kinds without anyone importing the modules that register them."""

import subprocess
import sys


def test_a_fresh_process_knows_every_builtin_objective_and_evaluator():
    code = ("from minicpm.train.objectives import OBJECTIVES\n"
            "from minicpm.eval.evaluators import EVALUATORS\n"
            "print(OBJECTIVES.kinds(), EVALUATORS.kinds(), 'dpo' in OBJECTIVES)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ("['dpo', 'next_token', 'sft'] ['answer_loss', 'heldout', 'lm_eval', 'loss_by_position', "
                           "'passkey', 'preference'] True")
