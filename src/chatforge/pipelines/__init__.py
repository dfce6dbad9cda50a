"""Drivers that chain stages (the top of the stack: only cli.py sits above them).

    label.py     `chatforge label`: sample K answers per prompt, rank them (a person at the
                 terminal or the gold labeler), judge policies by gold score
    rlhf.py      `chatforge rlhf`: sample -> rank -> reward model -> PPO, in rounds
    bon.py       `chatforge bon`: best-of-n / rejection-sampling fine-tuning, in rounds
    flywheel.py  `chatforge flywheel`: the store's feedback -> SFT, RM, PPO -> evaluate -> register
    speedrun.py  `chatforge speedrun`: the whole recipe, end to end, in a time budget
    scale.py     `chatforge scale`: scaling-law ladders, fits and plans (the fit math: eval/scaling.py)
    teacher.py   `chatforge data sft-default`: the default SFT set with a teacher model's answers

Every stage they call (train/, eval/, data/) is importable and runs on its own; a driver only
decides what runs next and skips what is already done.
"""
