"""Session-6 scratch (removed after its note): profile_step's categories with convolutions split
into weight gradients and forward/input gradients. YNN=<ynn_fusion_type> overrides the step's
option; MODEL, BATCH pick the net (memory_efficient).

    YNN=LIBRARY_FUSION_TYPE_REDUCE python benchmarks/profile_conv_kinds.py
"""
import sys, os, glob, tempfile, collections, re, json
HERE=os.path.dirname(os.path.abspath(__file__)); sys.path.insert(0,HERE); sys.path.insert(0,os.path.dirname(HERE))
from train import step
v=os.environ.get("YNN")
if v is not None: step.COMPILER_OPTIONS["cpu"]["xla_cpu_experimental_ynn_fusion_type"]=v
import train_step, jax, profile_step as P
b = train_step.build(os.environ.get("MODEL","densenet_bc_100"), int(os.environ.get("BATCH","64")), memory_efficient=True)
c = b.step.lower(b.state,b.data).compile(); instrs,comps = P.parse_hlo(c.as_text())
s=b.state; s,_=jax.block_until_ready(c(s,b.data))
per=collections.defaultdict(float)
with tempfile.TemporaryDirectory() as tmp:
  jax.profiler.start_trace(tmp)
  for _ in range(2): s,_=jax.block_until_ready(c(s,b.data))
  jax.profiler.stop_trace()
  path=glob.glob(os.path.join(tmp,"**","*.xplane.pb"),recursive=True)[-1]
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      for e in line.events:
        n=P.thunk_instruction(e.name, instrs)
        if n: per[n]+=e.duration_ns/1e9/2
g=collections.defaultdict(lambda:[0.0,0])
for n,t in per.items():
  i=instrs[n]; k=P.classify(i,comps)
  if 'conv' in k or 'convolution' in k:
    shp=re.findall(r'f32\[([\d,]+)\]', i['shape'])[0]
    dims=[int(x) for x in shp.split(',')]
    win=None
    ops = comps.get(i["calls"], []) if i["calls"] else [i]
    for o in ops:
      w=re.search(r"window=\{size=(\d+)x(\d+)", o["rest"])
      if w: win=w.group(1)
    sub = 'wgrad' if (len(dims)==4 and dims[1]==dims[2] and dims[1] in (3,1) and dims[0]!=int(os.environ.get("BATCH","64"))) else 'fwd/dgrad'
    if win and int(win)>3: sub='wgrad'
    k=k+':'+sub
  g[k][0]+=t; g[k][1]+=1
print("total", round(sum(per.values()),3))
for k,(t,n) in sorted(g.items(), key=lambda kv:-kv[1][0]): print(f"{k:40s} {t:7.3f}s {n}")
