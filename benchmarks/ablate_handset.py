"""Hand-set RAPID ablation on calibration images (2 per class of imagenet-calib = 300): switch depth x protected fraction vs ToMe.

    HF_HUB_CACHE=../shared/hf-cache/hub HF_HUB_OFFLINE=1 python benchmarks/ablate_handset.py
"""
import torch, timm, sys
from pathlib import Path
from PIL import Image
from timm.data import resolve_model_data_config, create_transform, ImageNetInfo
import rapid_search as rs
from rapid_search.search.space import project
torch.set_num_threads(2)
name = 'deit_tiny_patch16_224'
m = timm.create_model(name, pretrained=True).eval()
p = Path('/tmp/rapid_calib_deit_300.pt')  # decoded-image cache
if not p.exists():
    tf = create_transform(**resolve_model_data_config(m)); w2i = {n: i for i, n in enumerate(ImageNetInfo().label_names())}
    xs, ys = [], []
    for d in sorted(Path('../shared/data/imagenet-calib').iterdir()):
        for f in sorted(d.iterdir())[:2]:
            xs.append(tf(Image.open(f).convert('RGB'))); ys.append(w2i[d.name])
    torch.save((torch.stack(xs), torch.tensor(ys)), p)
X, Y = torch.load(p)
info = rs.model_info(m)
def acc(layers):
    rs.apply(m, rs.as_schedule(list(layers), m) if not isinstance(layers, rs.Schedule) else layers)
    with torch.inference_mode():
        pr = torch.cat([m(X[i:i+100]).argmax(-1) for i in range(0, len(X), 100)])
    rs.remove(m); return (pr == Y).float().mean().item()
print('n', len(X), 'base', acc(rs.empty_schedule(m)))
for ratio in [0.5, 0.35]:
    print(ratio, 'tome', acc(rs.tome_for_ratio(m, ratio)))
    for sw in [0, 3, 6, 9, 12]:
        for prot in [0.0, 0.25, 0.5]:
            if sw == 12 and prot > 0: continue
            shape = dict(switch=sw, prune_weight=1.0, decay=0.0, protect=prot, prune_threshold=None, merge_threshold=None)
            layers, c = project(info, shape, ratio*info.base_macs)
            print(ratio, 'switch', sw, 'protect', prot, round(acc(layers), 4), flush=True)
