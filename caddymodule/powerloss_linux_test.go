package caddymodule

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/etcaddy/etcaddy/storage"
)

// powerLossRounds is how many power cuts one data directory goes through. A
// cut finds a commit's writes unsynced about two times in three.
const powerLossRounds = 8

// TestPowerLossLosesNoAcknowledgedWrite is the kill -9 test with the power cut
// as well: the member's data directory is on a lossyFS, and after each kill
// whatever the member wrote to member.db since its last fsync or fdatasync is
// lost or kept piece by piece at random, as a disk may after a power failure.
// Restarted on what is left, the member must hold every write it acknowledged
// with its modifiedIndex, and go on from there. A member that answered before
// its commit was synced, or a file whose synced state depends on unsynced
// pages, fails it.
func TestPowerLossLosesNoAcknowledgedWrite(t *testing.T) {
	for _, tc := range []struct {
		name          string
		snapshotCount int
	}{
		{name: "default"},
		{name: "compacting", snapshotCount: 50},
	} {
		t.Run(tc.name, func(t *testing.T) {
			seed := uint64(time.Now().UnixNano())
			t.Logf("seed %d", seed)
			rng := rand.New(rand.NewPCG(seed, seed>>32))

			mnt := t.TempDir()
			disk := mountLossyFS(t, t.TempDir(), mnt)
			p := startEtcaddy(t, etcaddyOpts{SnapshotCount: tc.snapshotCount, DataDir: filepath.Join(mnt, "data")})
			c := crashClient(crashWriters)
			defer c.CloseIdleConnections()

			acked := make(map[string]crashAck)
			var highest uint64
			var lostPieces int
			for round := 0; round < powerLossRounds; round++ {
				delay := 100*time.Millisecond + time.Duration(rng.Int64N(int64(700*time.Millisecond)))
				roundAcks := crashRoundOn(t, []string{p.ClientURL}, c, round, delay, func() {
					disk.powerOff()
					p.kill9()
				})
				for k, a := range roundAcks {
					acked[k] = a
					highest = max(highest, a.Index)
				}
				lost, kept := disk.powerCut(t, rng)
				lostPieces += lost
				t.Logf("round %d: power cut after %v of writing, %d writes acknowledged, highest index %d; of the unsynced writes, %d pieces of 4 KiB lost, %d kept",
					round, delay.Round(time.Millisecond), len(roundAcks), highest, lost, kept)

				highest = crashRestartAndCheck(t, p, c, round, acked, highest)
			}
			// Sixteen writers keep a commit in flight nearly all the time: a
			// run in which no cut found unsynced pages tested nothing.
			if lostPieces == 0 {
				t.Errorf("none of %d power cuts came while a write was unsynced: the test did not cut power mid-commit", powerLossRounds)
			}
			p.stop()
		})
	}
}

// TestClusterPowerLossLosesNoAcknowledgedWrite cuts the power of a whole three-member
// cluster at once, each member on a lossyFS of its own, while 16 clients write through all
// three: every write a member acknowledged was durable in the log of a majority, so the
// members restarted on what their disks kept elect a leader that has it, and every member
// holds it again. A member that acknowledged a leader's entries before they were synced, or a
// leader that answered before its own commit, fails it (a follower that answers before its
// sync fails about one run in three: both followers must have lost the entry, and one of them
// must win the election).
func TestClusterPowerLossLosesNoAcknowledgedWrite(t *testing.T) {
	const rounds = 6
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, seed>>32))

	disks := make(map[string]*lossyFS)
	c := &testCluster{t: t, dataDir: func(name string) string {
		mnt := t.TempDir()
		disks[name] = mountLossyFS(t, t.TempDir(), mnt)
		return filepath.Join(mnt, "data")
	}}
	c.start(3)
	var urls []string
	for _, m := range c.members {
		urls = append(urls, m.ClientURL)
	}
	cl := crashClient(crashWriters)
	defer cl.CloseIdleConnections()

	acked := make(map[string]crashAck)
	var lostPieces int
	for round := 0; round < rounds; round++ {
		delay := 200*time.Millisecond + time.Duration(rng.Int64N(int64(800*time.Millisecond)))
		roundAcks := crashRoundOn(t, urls, cl, round, delay, func() {
			for _, d := range disks {
				d.powerOff()
			}
			for _, m := range c.members {
				m.kill9()
			}
		})
		maps.Copy(acked, roundAcks)
		var cut []string
		for _, m := range c.members {
			lost, kept := disks[m.Name].powerCut(t, rng)
			lostPieces += lost
			cut = append(cut, fmt.Sprintf("%s %d lost, %d kept", m.Name, lost, kept))
		}
		t.Logf("round %d: power cut after %v of writing, %d writes acknowledged; pieces of 4 KiB of the unsynced writes: %s",
			round, delay.Round(time.Millisecond), len(roundAcks), strings.Join(cut, "; "))

		powerRestartCluster(t, c, round, acked)
	}
	if lostPieces == 0 {
		t.Errorf("none of %d power cuts came while a write was unsynced: the test did not cut power mid-commit", rounds)
	}
}

// powerRestartCluster starts every member of c again after a power cut, all at once (none
// can be healthy before a quorum runs), and checks every acknowledged write on each (see
// checkAckedEverywhere); it ends the test when anything failed.
func powerRestartCluster(t *testing.T, c *testCluster, round int, acked map[string]crashAck) {
	t.Helper()
	for _, m := range c.members {
		m.startProcess(t)
	}
	for _, m := range c.members {
		if err := m.waitHealthy(30 * time.Second); err != nil {
			t.Fatalf("round %d: %s did not become healthy after the power cut: %v", round, m.Name, err)
		}
	}
	checkAckedEverywhere(t, c.members, "/crash", acked)
	if t.Failed() {
		t.FailNow()
	}
}

// TestClusterPowerLossAfterSnapshotCatchUp cuts the power of a whole cluster after a follower
// caught up by snapshot and then, with the other follower down, was the one whose copies made
// the leader's entries committed: the received file, renamed and installed over member.db,
// must be on its disk by then (its directory synced), or the follower comes back with the
// state from before it, without the entries it acknowledged, and a leader elected without
// the old leader's vote loses writes that were answered.
func TestClusterPowerLossAfterSnapshotCatchUp(t *testing.T) {
	const (
		rounds        = 5
		snapshotCount = 50
	)
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, seed>>32))

	disks := make(map[string]*lossyFS)
	c := &testCluster{t: t, snapshotCount: snapshotCount, dataDir: func(name string) string {
		mnt := t.TempDir()
		disks[name] = mountLossyFS(t, t.TempDir(), mnt)
		return filepath.Join(mnt, "data")
	}}
	c.start(3)
	cl := crashClient(crashWriters)
	defer cl.CloseIdleConnections()
	// Should it fail, whether each member's own file holds together tells a
	// damaged store from a damaged copy of one.
	t.Cleanup(func() {
		if t.Failed() {
			for _, m := range c.members {
				t.Logf("%s's member.db, copied as it is now: %s", m.Name, powerLossCheckCopy(t, m.DataDir))
				t.Logf("%s's data directory: %s", m.Name, powerLossDescribe(m.DataDir, filepath.Join(disks[m.Name].backing, "data")))
				if m.running() {
					t.Logf("%s's mapping of member.db: %s", m.Name, powerLossCompareMapping(m.Cmd.Process.Pid, filepath.Join(m.DataDir, "member.db")))
				}
				if keep := os.Getenv("ETCADDY_KEEP_FAILED"); keep != "" {
					// For a look after the test: the directory under the
					// mount (what the disk holds) and the member's log.
					to := filepath.Join(keep, fmt.Sprintf("seed-%d", seed), m.Name)
					var out []byte
					err := os.MkdirAll(to, 0o755)
					if err == nil {
						out, err = exec.Command("cp", "-a", disks[m.Name].backing, filepath.Join(to, "disk")).CombinedOutput()
					}
					if err == nil {
						out, err = exec.Command("cp", "-a", m.LogPath, to).CombinedOutput()
					}
					t.Logf("%s's disk and log kept in %s: %v %s", m.Name, to, err, out)
				}
			}
		}
	})

	acked := make(map[string]crashAck)
	for round := 0; round < rounds; round++ {
		leader := c.byName(agreedLeader(t, c.members, "", 20*time.Second).Name)
		var followers []*testMember
		for _, m := range c.members {
			if m != leader {
				followers = append(followers, m)
			}
		}
		victim, other := followers[round%2], followers[1-round%2]

		victim.kill9()
		for i := range 4 * snapshotCount {
			key := fmt.Sprintf("/crash/down%d/%04d", round, i)
			via := []*testMember{leader, other}[i%2]
			_, node, err := crashPut(context.Background(), cl, via.ClientURL, key, "v")
			if err != nil {
				t.Fatalf("round %d: writing with %s down: %v", round, victim.Name, err)
			}
			acked[key] = crashAck{Value: "v", Index: node.ModifiedIndex}
		}
		logFrom := logSize(victim.proc)
		victim.startProcess(t)
		target, _ := plainIndex(leader)
		waitCaughtUp(t, victim, target, 30*time.Second)
		lines, err := logLinesSince(victim.proc, logFrom)
		if err != nil {
			t.Fatal(err)
		}
		installed := 0
		for _, line := range lines {
			if strings.Contains(line, `"snapshot installed"`) {
				installed++
			}
		}
		if installed == 0 {
			t.Fatalf("round %d: %s caught up without a snapshot:\n%s", round, victim.Name, raftLogSince(victim.proc, logFrom, 40))
		}

		// Now the leader commits with the victim's copies alone.
		other.kill9()
		delay := 100*time.Millisecond + time.Duration(rng.Int64N(int64(300*time.Millisecond)))
		maps.Copy(acked, crashRoundOn(t, []string{leader.ClientURL, victim.ClientURL}, cl, round, delay, func() {
			for _, d := range disks {
				d.powerOff()
			}
			leader.kill9()
			victim.kill9()
		}))
		for _, m := range c.members {
			disks[m.Name].powerCut(t, rng)
		}
		powerRestartCluster(t, c, round, acked)
		t.Logf("round %d: %s caught up by snapshot, %s down, then the power cut; %d acknowledged writes on every member",
			round, victim.Name, other.Name, len(acked))
	}
}

// powerLossCheckCopy copies dir's member.db (its member may be running) and
// opens the copy as a member would, which checks every page: it says what
// that found.
func powerLossCheckCopy(t *testing.T, dir string) string {
	b, err := os.ReadFile(filepath.Join(dir, "member.db"))
	if err != nil {
		return err.Error()
	}
	cp := t.TempDir()
	if err := os.WriteFile(filepath.Join(cp, "member.db"), b, 0o600); err != nil {
		return err.Error()
	}
	st, err := storage.Open(cp)
	if err != nil {
		return err.Error()
	}
	defer st.Close()
	return fmt.Sprintf("holds together (%d bytes)", len(b))
}

// powerLossDescribe says what a member's data directory holds, seen through
// the lossy disk's mount (dir) and in the directory under it (backing):
// each file's size and inode, and for member.db its two meta pages (bbolt's
// layout: txid, root, freelist and high-water page) and whether the bytes
// read through the mount are the backing file's (the first page where they
// differ). A member whose live view of its file went wrong while the file
// holds together leaves that here.
func powerLossDescribe(dir, backing string) string {
	var b strings.Builder
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err.Error()
	}
	for _, e := range ents {
		info, err := e.Info()
		if err != nil {
			fmt.Fprintf(&b, "%s: %v; ", e.Name(), err)
			continue
		}
		var ino uint64
		if st, ok := info.Sys().(*syscall.Stat_t); ok {
			ino = st.Ino
		}
		fmt.Fprintf(&b, "%s %d bytes inode %d; ", e.Name(), info.Size(), ino)
	}
	mounted, err1 := os.ReadFile(filepath.Join(dir, "member.db"))
	under, err2 := os.ReadFile(filepath.Join(backing, "member.db"))
	if err1 != nil || err2 != nil {
		fmt.Fprintf(&b, "member.db: %v, %v", err1, err2)
		return b.String()
	}
	for _, pg := range []int{0, 1} {
		fmt.Fprintf(&b, "meta %d: %s; ", pg, boltMetaSummary(mounted, pg))
	}
	switch {
	case len(mounted) != len(under):
		fmt.Fprintf(&b, "through the mount %d bytes, under it %d", len(mounted), len(under))
	case bytes.Equal(mounted, under):
		b.WriteString("the same through the mount and under it")
	default:
		for i := 0; i < len(mounted); i += 4096 {
			if !bytes.Equal(mounted[i:min(i+4096, len(mounted))], under[i:min(i+4096, len(under))]) {
				fmt.Fprintf(&b, "through the mount and under it, page %d differs first", i/4096)
				break
			}
		}
	}
	return b.String()
}

// powerLossCompareMapping compares what process pid sees of path through
// its mapping of it (bbolt reads the file through one mmap) with the file
// read now: the pages that differ are pages the process reads stale (the
// kernel's page cache serves read(2) the file's contents, and a mapping
// left pointing at a page no longer in the cache would not see them). It
// says how many of the file's pages differ, and the first few.
func powerLossCompareMapping(pid int, path string) string {
	file, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	maps, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		return err.Error()
	}
	var start, off uint64
	found := false
	for _, line := range strings.Split(string(maps), "\n") {
		// start-end perms offset dev inode path
		f := strings.Fields(line)
		if len(f) < 6 || f[5] != path {
			continue
		}
		var end uint64
		if _, err := fmt.Sscanf(f[0], "%x-%x", &start, &end); err != nil {
			return err.Error()
		}
		if _, err := fmt.Sscanf(f[2], "%x", &off); err != nil {
			return err.Error()
		}
		found = true
		break
	}
	if !found {
		return "no mapping of " + path
	}
	if off != 0 {
		return fmt.Sprintf("mapped from offset %d", off)
	}
	mem, err := os.Open(fmt.Sprintf("/proc/%d/mem", pid))
	if err != nil {
		return err.Error()
	}
	defer mem.Close()
	seen := make([]byte, len(file))
	if _, err := mem.ReadAt(seen, int64(start)); err != nil {
		return fmt.Sprintf("reading the mapping: %v", err)
	}
	// The process may be writing: a page counts as different only when
	// the mapping has neither what the file held before it was read nor
	// after.
	again, err := os.ReadFile(path)
	if err != nil || len(again) < len(file) {
		return fmt.Sprintf("reading the file again: %v", err)
	}
	var differ []int
	for i := 0; i < len(file); i += 4096 {
		j := min(i+4096, len(file))
		if !bytes.Equal(seen[i:j], file[i:j]) && !bytes.Equal(seen[i:j], again[i:j]) {
			differ = append(differ, i/4096)
		}
	}
	if len(differ) == 0 {
		return fmt.Sprintf("the same as the file (%d pages)", len(file)/4096)
	}
	return fmt.Sprintf("%d of %d pages differ from the file, the first: %v", len(differ), len(file)/4096, differ[:min(len(differ), 10)])
}

// boltMetaSummary reads meta page pg of a bbolt file (4 KiB pages): its
// header is 16 bytes, then magic, version, page size and flags (4 bytes
// each), the root bucket (root page, sequence), the freelist page, the
// high-water page and the txid (8 bytes each).
func boltMetaSummary(b []byte, pg int) string {
	off := pg * 4096
	if len(b) < off+80 {
		return "short"
	}
	m := b[off+16:]
	u64 := func(i int) uint64 { return binary.LittleEndian.Uint64(m[i:]) }
	return fmt.Sprintf("txid %d root %d freelist %#x pgid %d", u64(48), u64(16), u64(32), u64(40))
}
