#!/bin/busybox sh
# PID 1 of the vm-test VM (`cargo xtask vm-test`). Reports every step on the
# serial console as `@@ step NAME ok|FAIL DETAIL`; the host reads those lines,
# and a step that never reports counts as failed. Values from the kernel/user
# contract (config bytes, stat indexes, addresses) come from /vm-test.env,
# written by the host from limiter-common.
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/bin
# busybox sh runs its own applets before PATH: iproute2 is called by its path.
IP=/usr/sbin/ip
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs run /run
mkdir -p /run/netns /tmp
. /vm-test.env

PIN=/sys/fs/bpf/limiter
PROG=$PIN/limiter
MAPS=$PIN/maps
FAILED=0

report() { # NAME ok|FAIL DETAIL
    [ "$2" = ok ] || FAILED=1
    echo "@@ step $1 $2 $3"
}

# Runs a command, shows its output, and reports ok or FAIL with the output's
# last line.
run() { # NAME COMMAND...
    name=$1
    shift
    out=$("$@" 2>&1)
    rc=$?
    [ -n "$out" ] && echo "$out"
    last=$(echo "$out" | tail -n 1)
    if [ $rc -eq 0 ]; then report "$name" ok "$last"; else report "$name" FAIL "exit $rc: $last"; fi
    return $rc
}

# Whether the per-CPU counter at little-endian index KEY is non-zero.
stat_nonzero() { # KEY
    bpftool map lookup pinned $MAPS/stats key hex $1 | grep '^value' | grep -qv ': \(00 \)*00 *$'
}

# One request/response over TCP to the API port (the server answers `hi`).
request() { # [ip netns exec NS] ADDR
    echo | "$@" $API_PORT 2>&1 | grep -q '^hi$'
}

echo "@@ kernel $(uname -r)"
run bpffs mount -t bpf bpf /sys/fs/bpf

if bpftool feature probe kernel | grep -q 'bpf_ktime_get_coarse_ns'; then COARSE=yes; else COARSE=no; fi
echo "@@ feature coarse_clock $COARSE"

ok=1
for module in /modules/*.ko; do
    [ -e "$module" ] || continue
    insmod "$module" || { report modules FAIL "insmod $module"; ok=0; }
done
[ $ok = 1 ] && report modules ok "$(ls /modules | tr '\n' ' ')"

# The suite moves windows up to 21 s into the past (two 10 s windows plus a
# tenth): CLOCK_MONOTONIC must be older than that, which it is not seconds
# after boot.
read up _ < /proc/uptime
while [ "${up%%.*}" -lt 25 ]; do
    sleep 1
    read up _ < /proc/uptime
done

# The promotion tests hold real TCP connections on loopback, which a booted
# host has up and this init has not brought up yet.
$IP link set lo up

# The XDP suite through BPF_PROG_TEST_RUN, exactly as on the host; its output
# streams to the console, so a hang shows which test it was in.
{ xdp-tests --test-threads=2 2>&1; echo $? > /tmp/suite.rc; } | tee /tmp/suite.log
rc=$(cat /tmp/suite.rc)
summary=$(grep '^test result:' /tmp/suite.log | tail -n 1)
if [ $rc -eq 0 ] && echo "$summary" | grep -q '^test result: ok\.'; then
    report suite ok "${summary#test result: }"
else
    report suite FAIL "exit $rc: $(grep -E '^test .* FAILED$' /tmp/suite.log | tr '\n' ' ')${summary}"
fi

# Which defence this kernel gives new clients during a spoofed flood: the SYN
# challenge answers from XDP (XDP_TX) with no helper or sysctl, so it is the
# same on every kernel; its tests in the suite above must all have passed here.
passed=$(grep -cE '^test challenge::.* ok$' /tmp/suite.log)
failed=$(grep -cE '^test challenge::.* FAILED$' /tmp/suite.log)
if [ "$passed" -gt 0 ] && [ "$failed" -eq 0 ]; then
    report syn-challenge ok "new clients in a spoofed flood: SYN challenge via XDP_TX ($passed tests)"
else
    report syn-challenge FAIL "$passed challenge tests passed, $failed failed"
fi

# The probe against the kernel itself: with the global forced to 1 the program
# must load exactly where the helper exists, and otherwise be refused for it.
refusal=$(vm-load --force-coarse-clock 2>&1)
rc=$?
echo "$refusal"
verifier=$(echo "$refusal" | grep -m 1 -E '(invalid|unknown) func')
if [ "$COARSE" = yes ] && [ $rc -eq 0 ]; then
    report coarse-clock ok "loads with USE_COARSE_CLOCK = 1"
elif [ "$COARSE" = no ] && [ $rc -eq 3 ] && [ -n "$verifier" ]; then
    report coarse-clock ok "refused with USE_COARSE_CLOCK = 1, verifier: $verifier"
else
    report coarse-clock FAIL "probe says $COARSE, forced load exit $rc: $(echo "$refusal" | tail -n 1)"
fi

# The agent's object, loaded with aya (bpftool's libbpf refuses aya-ebpf's
# legacy `maps` section) and pinned; bpftool does everything after that.
run load vm-load $PIN
run config bpftool map update pinned $MAPS/config key hex 00 00 00 00 value hex $CONFIG_HEX
run attach-lo sh -c "$IP link set lo up && bpftool net attach xdpgeneric pinned $PROG dev lo"
run veth sh -c "$IP netns add client &&
    $IP link add veth0 type veth peer name veth1 netns client &&
    $IP addr add $SERVER_V4/24 dev veth0 && $IP link set veth0 up &&
    $IP -n client addr add $CLIENT_V4/24 dev veth1 && $IP -n client link set veth1 up &&
    $IP -n client link set lo up"
run attach-veth bpftool net attach xdpdrv pinned $PROG dev veth0

id=$(bpftool prog show pinned $PROG | sed -n 's/^\([0-9]*\): xdp .*name limiter .*/\1/p')
if [ -n "$id" ]; then report prog-show ok "id $id: $(bpftool prog show pinned $PROG | head -n 1)"; else
    bpftool prog show pinned $PROG
    report prog-show FAIL "no XDP program named limiter pinned at $PROG"
fi
net=$(bpftool net show)
echo "$net"
if echo "$net" | grep -q "^lo(1) generic id $id\$" && echo "$net" | grep -q "^veth0([0-9]*) driver id $id\$"; then
    report net-show ok "lo generic, veth0 driver: id $id"
else
    report net-show FAIL "program $id not attached to lo (generic) and veth0 (driver)"
fi

# Real traffic: a client in its own namespace through the veth pair, and one on lo.
nc -ll -p $API_PORT -e /bin/echo hi &
server=$!
sleep 1
n=0
for i in 1 2 3; do request $IP netns exec client nc -w 5 $SERVER_V4 && n=$((n + 1)); done
if [ $n = 3 ]; then report traffic-veth ok "3 of 3 requests from $CLIENT_V4 answered"; else
    report traffic-veth FAIL "$n of 3 requests from $CLIENT_V4 answered"; fi
if request nc -w 5 127.0.0.1; then report traffic-lo ok "request over lo answered"; else
    report traffic-lo FAIL "request over lo not answered"; fi

sources=$(bpftool -j map dump pinned $MAPS/sources)
echo "$sources"
if echo "$sources" | grep -q "$CLIENT_KEY_JSON" && echo "$sources" | grep -q "$LOOPBACK_KEY_JSON"; then
    report map-sources ok "entries for $CLIENT_V4 and 127.0.0.1"
else
    report map-sources FAIL "no entry for $CLIENT_V4 or 127.0.0.1"
fi
bpftool map lookup pinned $MAPS/stats key hex $STAT_PASS_API
if stat_nonzero "$STAT_PASS_API"; then report map-stats ok "pass/api counted"; else
    report map-stats FAIL "pass/api is zero after API traffic"; fi

# A ban written into the trie drops the client's SYNs at the veth; lo still passes.
run ban sh -c "bpftool map update pinned $MAPS/bans key hex $BAN_KEY_HEX value hex $BAN_VALUE_HEX &&
    bpftool map update pinned $MAPS/config key hex 00 00 00 00 value hex $CONFIG_BANNED_HEX"
if request $IP netns exec client nc -w 3 $SERVER_V4; then
    report ban-drops FAIL "a banned client's request was answered"
elif ! stat_nonzero "$STAT_DROP_BANNED"; then
    report ban-drops FAIL "request failed but drop/banned is zero"
elif ! request nc -w 5 127.0.0.1; then
    report ban-drops FAIL "lo traffic stopped after banning $CLIENT_V4"
else
    bpftool map lookup pinned $MAPS/stats key hex $STAT_DROP_BANNED
    report ban-drops ok "banned $CLIENT_V4 dropped (drop/banned counted), lo still answered"
fi
kill $server

run detach sh -c "bpftool net detach xdpgeneric dev lo && bpftool net detach xdpdrv dev veth0 &&
    ! bpftool net show | grep -q 'id $id'"

echo "@@ done failed=$FAILED"
poweroff -f
