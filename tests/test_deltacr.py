import time, pytest, threading
import deltabox

LAUNCH = ("import subprocess, sys\n"
          "p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=open(sys.argv[1], 'ab'),"
          " stderr=subprocess.STDOUT, start_new_session=True)\n"
          "print(p.pid)\n")

def spawn(sbx, *argv, log="/dev/null"):
    r = sbx.exec(["python3", "-c", LAUNCH, log, *argv]).check()
    return int(r.stdout)

CONT = """
import signal, time
n = 0
def h(*_):
    global n; n += 1
    open('/tmp/conts', 'w').write(str(n))
signal.signal(signal.SIGCONT, h)
while True: time.sleep(0.05)
"""

def st(demo, pid):
    return demo.exec(["sh", "-c", f"cut -d' ' -f3 /proc/{pid}/stat; cat /tmp/conts 2>/dev/null"]).stdout

def test_stopped(demo):
    demo.write_file("/tmp/cont.py", CONT)
    sl = spawn(demo, "sleep", "1000")
    cp = spawn(demo, "python3", "/tmp/cont.py")
    demo.exec(f"kill -STOP {sl}")
    time.sleep(0.3)
    print("before", st(demo, sl), st(demo, cp))
    ck = demo.checkpoint("a", full=True)
    print("after ck", st(demo, sl), st(demo, cp))
    time.sleep(1)
    r = demo.rollback(ck); print(r.path)
    time.sleep(0.2)
    print("after double", st(demo, sl), st(demo, cp))
    demo.checkpoint("b", full=True)
    r = demo.rollback(ck); print(r.path)
    time.sleep(0.2)
    print("after restore", st(demo, sl), st(demo, cp))

def test_race(demo):
    stop = False; errs = []; n = [0]
    def loop():
        while not stop:
            try:
                r = demo.exec("true"); assert r.exit_code == 0; n[0] += 1
            except Exception as e:
                errs.append(repr(e))
    t = threading.Thread(target=loop); t.start()
    res = []
    for i in range(15):
        try:
            demo.checkpoint(f"c{i}", full=True); res.append("ok")
        except deltabox.DeltaboxError as e:
            res.append(str(e)[:300])
        time.sleep(0.05)
    stop = True; t.join()
    print("execs", n[0], "errs", errs)
    for x in res: print("CK", x)
