"""The offline demo (`tatitok-fast demo --out DIR`): procedural captioned shapes, a tiny
TA-TiTok + MaskGen-VQ trained on them, and prompt-adherence scores from a non-learned
detector.

    shapes.py    renderer, caption grammar, held-out colour-shape pairs, webdataset writer
    detector.py  non-learned shape/colour detector and prompt-adherence scores
    report.py    report.json, report.md and grid.png
    run.py       the stages, in order
"""
