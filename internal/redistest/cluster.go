package redistest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Slots is the number of hash slots of a Redis Cluster.
const Slots = 16384

// clusterTimeout bounds the creation of a cluster, from the first
// ADDSLOTSRANGE to the last sanity GET. It normally takes about 2s: a master
// keeps cluster_state:fail for 2s after start-up (CLUSTER_WRITABLE_DELAY).
const clusterTimeout = 15 * time.Second

// Cluster is a local Redis Cluster of masters without replicas, each a
// Server on 127.0.0.1 with cluster mode on and its own directory. Master i
// owns the i-th of len(Servers) even ranges of slots (see SlotRange).
type Cluster struct {
	Servers []*Server
	Addrs   []string // Servers[i].Addr

	ids []string // node ids, Servers[i]'s in ids[i]
}

// NewCluster starts a cluster of the given number of masters for one test
// and stops it in t.Cleanup. It returns once every node reports
// cluster_state:ok and the same, complete slot map, and a ClusterClient has
// written and read keys on every master. When redis-server is missing it
// skips the test, or fails it when REDLATCH_REQUIRE_REDIS=1.
func NewCluster(t testing.TB, masters int) *Cluster {
	t.Helper()
	needServer(t)
	c, err := newCluster(masters)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// newCluster starts the nodes (concurrently) and creates the cluster.
func newCluster(masters int) (*Cluster, error) {
	if masters < 1 || masters > Slots {
		return nil, fmt.Errorf("redistest: a cluster of %d masters", masters)
	}
	c := &Cluster{Servers: make([]*Server, masters), Addrs: make([]string, masters)}
	errs := make([]error, masters)
	var wg sync.WaitGroup
	for i := range c.Servers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.Servers[i], errs[i] = newServer(true)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		c.Close()
		return nil, err
	}
	for i, s := range c.Servers {
		c.Addrs[i] = s.Addr
	}
	if err := c.create(); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// SlotRange returns the first and last slot that master i of a cluster of n
// masters owns.
func SlotRange(i, n int) (first, last int) {
	return i * Slots / n, (i+1)*Slots/n - 1
}

// create makes one cluster of the fresh nodes without redis-cli: it gives
// each node a distinct config epoch (as redis-cli does, so that no epoch
// collision has to be resolved), assigns it its slot range with CLUSTER
// ADDSLOTSRANGE, introduces the others to node 0 with CLUSTER MEET, and waits
// until the cluster is ready.
func (c *Cluster) create() error {
	ctx, cancel := context.WithTimeout(context.Background(), clusterTimeout)
	defer cancel()
	n := len(c.Servers)
	nodes := make([]*redis.Client, n)
	for i, s := range c.Servers {
		opt := s.Options()
		opt.MaxRetries = -1
		nodes[i] = redis.NewClient(opt)
	}
	defer func() {
		for _, r := range nodes {
			_ = r.Close()
		}
	}()

	c.ids = make([]string, n)
	for i, r := range nodes {
		id, err := r.ClusterMyID(ctx).Result()
		if err != nil {
			return fmt.Errorf("redistest: CLUSTER MYID on %s: %w", c.Addrs[i], err)
		}
		c.ids[i] = id
		if err := r.Do(ctx, "CLUSTER", "SET-CONFIG-EPOCH", i+1).Err(); err != nil {
			return fmt.Errorf("redistest: CLUSTER SET-CONFIG-EPOCH on %s: %w", c.Addrs[i], err)
		}
		// Not r.ClusterAddSlotsRange: go-redis sends that as CLUSTER
		// ADDSLOTS with every slot listed.
		first, last := SlotRange(i, n)
		if err := r.Do(ctx, "CLUSTER", "ADDSLOTSRANGE", first, last).Err(); err != nil {
			return fmt.Errorf("redistest: CLUSTER ADDSLOTSRANGE on %s: %w", c.Addrs[i], err)
		}
	}
	for i := 1; i < n; i++ {
		host, port, _ := net.SplitHostPort(c.Addrs[i])
		if err := nodes[0].ClusterMeet(ctx, host, port).Err(); err != nil {
			return fmt.Errorf("redistest: CLUSTER MEET %s: %w", c.Addrs[i], err)
		}
	}
	if err := c.waitReady(ctx, nodes); err != nil {
		return err
	}
	if err := c.sanity(ctx); err != nil {
		return fmt.Errorf("redistest: cluster %v: %w\n%s", c.Addrs, err, c.describe(nodes))
	}
	return nil
}

// WaitReady waits until the cluster is whole again, e.g. after a node was
// killed and started: every node reports cluster_state:ok and the initial
// slot map (as NewCluster does). It fails t after 15s.
func (c *Cluster) WaitReady(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), clusterTimeout)
	defer cancel()
	nodes := make([]*redis.Client, len(c.Servers))
	for i, s := range c.Servers {
		nodes[i] = redis.NewClient(s.Options())
	}
	defer func() {
		for _, r := range nodes {
			_ = r.Close()
		}
	}()
	if err := c.waitReady(ctx, nodes); err != nil {
		t.Fatal(err)
	}
}

// waitReady polls ready every 20ms until it succeeds or ctx ends.
func (c *Cluster) waitReady(ctx context.Context, nodes []*redis.Client) error {
	for {
		err := c.ready(ctx, nodes)
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("redistest: cluster %v not ready: %w\n%s", c.Addrs, err, c.describe(nodes))
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// ready returns nil when every node reports cluster_state:ok with all slots
// assigned and ok, knows exactly the n nodes, and answers CLUSTER SLOTS with
// exactly the intended map: range i owned by node ids[i] at Addrs[i]. Then
// a ClusterClient, whichever node it asks, gets the final topology.
func (c *Cluster) ready(ctx context.Context, nodes []*redis.Client) error {
	ids := c.ids
	n := strconv.Itoa(len(nodes))
	want := map[string]string{
		"cluster_state":          "ok",
		"cluster_slots_assigned": strconv.Itoa(Slots),
		"cluster_slots_ok":       strconv.Itoa(Slots),
		"cluster_known_nodes":    n,
		"cluster_size":           n,
	}
	for i, r := range nodes {
		info, err := r.ClusterInfo(ctx).Result()
		if err != nil {
			return fmt.Errorf("CLUSTER INFO on %s: %w", c.Addrs[i], err)
		}
		fields := map[string]string{}
		for _, line := range strings.Split(info, "\n") {
			if k, v, ok := strings.Cut(strings.TrimSpace(line), ":"); ok {
				fields[k] = v
			}
		}
		for k, v := range want {
			if fields[k] != v {
				return fmt.Errorf("%s: %s:%s, want %s", c.Addrs[i], k, fields[k], v)
			}
		}
		slots, err := r.ClusterSlots(ctx).Result()
		if err != nil {
			return fmt.Errorf("CLUSTER SLOTS on %s: %w", c.Addrs[i], err)
		}
		if len(slots) != len(nodes) {
			return fmt.Errorf("%s: CLUSTER SLOTS has %d ranges, want %d", c.Addrs[i], len(slots), len(nodes))
		}
		sort.Slice(slots, func(a, b int) bool { return slots[a].Start < slots[b].Start })
		for j, sl := range slots {
			first, last := SlotRange(j, len(nodes))
			if sl.Start != first || sl.End != last || len(sl.Nodes) != 1 ||
				sl.Nodes[0].Addr != c.Addrs[j] || sl.Nodes[0].ID != ids[j] {
				return fmt.Errorf("%s: CLUSTER SLOTS range %d is %+v, want %d-%d on %s (%s)",
					c.Addrs[i], j, sl, first, last, c.Addrs[j], ids[j])
			}
		}
	}
	return nil
}

// sanity writes, reads and deletes a key on every master through a
// ClusterClient made from Options.
func (c *Cluster) sanity(ctx context.Context) error {
	cc := redis.NewClusterClient(c.Options())
	defer cc.Close()
	for i := range c.Servers {
		for _, key := range keysOn(i, len(c.Servers), 2) {
			if err := cc.Set(ctx, key, key, time.Minute).Err(); err != nil {
				return fmt.Errorf("sanity SET %s: %w", key, err)
			}
			if v, err := cc.Get(ctx, key).Result(); err != nil || v != key {
				return fmt.Errorf("sanity GET %s: %q, %v", key, v, err)
			}
			if err := cc.Del(ctx, key).Err(); err != nil {
				return fmt.Errorf("sanity DEL %s: %w", key, err)
			}
		}
	}
	return nil
}

// keysOn returns count keys whose slots master i of n owns.
func keysOn(i, n, count int) []string {
	first, last := SlotRange(i, n)
	var keys []string
	for k := 0; len(keys) < count; k++ {
		key := "redistest:sanity:{" + strconv.Itoa(k) + "}"
		if s := KeySlot(key); s >= first && s <= last {
			keys = append(keys, key)
		}
	}
	return keys
}

// describe returns every node's CLUSTER INFO and CLUSTER NODES, for error
// messages.
func (c *Cluster) describe(nodes []*redis.Client) string {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	var b strings.Builder
	for i, r := range nodes {
		info, err1 := r.ClusterInfo(ctx).Result()
		ns, err2 := r.ClusterNodes(ctx).Result()
		fmt.Fprintf(&b, "--- node %s ---\n%s%v\n%s%v\n", c.Addrs[i], info, err1, ns, err2)
	}
	return b.String()
}

// Options returns cluster client options for the cluster: every node's
// address, context deadlines honoured on the socket, dialing given up after
// 1s and reads and writes after 2s.
func (c *Cluster) Options() *redis.ClusterOptions {
	return &redis.ClusterOptions{
		Addrs:                 append([]string(nil), c.Addrs...),
		ContextTimeoutEnabled: true,
		DialTimeout:           time.Second,
		ReadTimeout:           2 * time.Second,
		WriteTimeout:          2 * time.Second,
	}
}

// Client returns a new cluster client, from Options, closed in t.Cleanup.
func (c *Cluster) Client(t testing.TB) *redis.ClusterClient {
	t.Helper()
	cc := redis.NewClusterClient(c.Options())
	t.Cleanup(func() { _ = cc.Close() })
	return cc
}

// DefaultOptionsClient is Client with go-redis's default
// ContextTimeoutEnabled (off) and a ReadTimeout of 5s, which a call that
// does not return by its ctx overruns plainly; tune, if any, changes the
// options further.
func (c *Cluster) DefaultOptionsClient(t testing.TB, tune ...func(*redis.ClusterOptions)) *redis.ClusterClient {
	t.Helper()
	o := c.Options()
	o.ContextTimeoutEnabled = false
	o.ReadTimeout = 5 * time.Second
	for _, f := range tune {
		f(o)
	}
	cc := redis.NewClusterClient(o)
	t.Cleanup(func() { _ = cc.Close() })
	return cc
}

// ServerFor returns the master that owns key's slot in the initial slot
// map (the cluster never moves slots by itself).
func (c *Cluster) ServerFor(key string) *Server {
	slot, n := KeySlot(key), len(c.Servers)
	for i := range c.Servers {
		if _, last := SlotRange(i, n); slot <= last {
			return c.Servers[i]
		}
	}
	return c.Servers[n-1]
}

// Close stops every node for good. It is idempotent.
func (c *Cluster) Close() {
	for _, s := range c.Servers {
		if s != nil {
			s.Close()
		}
	}
}

// KeySlot returns the cluster hash slot of key, as CLUSTER KEYSLOT does:
// CRC16 (XMODEM) of the key's hash tag, the part between the first "{" and
// the next "}" when that is not empty, or of the whole key, modulo 16384.
func KeySlot(key string) int {
	if i := strings.IndexByte(key, '{'); i >= 0 {
		if j := strings.IndexByte(key[i+1:], '}'); j > 0 {
			key = key[i+1 : i+1+j]
		}
	}
	var crc uint16
	for k := 0; k < len(key); k++ {
		crc ^= uint16(key[k]) << 8
		for b := 0; b < 8; b++ {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return int(crc) % Slots
}

// StartMigration begins moving the slot of keys (one slot) from its master
// in the initial map to Servers[to], and moves keys, but not the slot: the
// old master answers -ASK for them from then on, and the new one serves
// them after ASKING. It returns the old master's index.
func (c *Cluster) StartMigration(t testing.TB, to int, keys ...string) (from int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	slot := KeySlot(keys[0])
	from = slices.Index(c.Servers, c.ServerFor(keys[0]))
	src, dst := c.Servers[from].Client(t), c.Servers[to].Client(t)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("redistest: StartMigration of slot %d from %d to %d: %v", slot, from, to, err)
		}
	}
	must(dst.Do(ctx, "CLUSTER", "SETSLOT", slot, "IMPORTING", c.ids[from]).Err())
	must(src.Do(ctx, "CLUSTER", "SETSLOT", slot, "MIGRATING", c.ids[to]).Err())
	host, port, _ := strings.Cut(c.Addrs[to], ":")
	args := []any{"MIGRATE", host, port, "", 0, 5000, "KEYS"}
	for _, k := range keys {
		args = append(args, k)
	}
	must(src.Do(ctx, args...).Err())
	return from
}

// MoveSlot migrates slot, with its keys, from the master that owns it to
// Servers[to], as a resharding does (IMPORTING/MIGRATING, MIGRATE, SETSLOT
// NODE on every master), and returns once every node maps the slot to its
// new owner. ServerFor keeps answering from the initial map.
func (c *Cluster) MoveSlot(t testing.TB, slot, to int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	nodes := make([]*redis.Client, len(c.Servers))
	for i, s := range c.Servers {
		nodes[i] = redis.NewClient(s.Options())
		defer nodes[i].Close()
	}
	owner := func(n *redis.Client) (string, error) {
		slots, err := n.ClusterSlots(ctx).Result()
		if err != nil {
			return "", err
		}
		for _, sl := range slots {
			if slot >= sl.Start && slot <= sl.End && len(sl.Nodes) > 0 {
				return sl.Nodes[0].ID, nil
			}
		}
		return "", fmt.Errorf("slot %d not served", slot)
	}
	fromID, err := owner(nodes[to])
	if err != nil {
		t.Fatalf("redistest: MoveSlot: %v", err)
	}
	from := -1
	for i, id := range c.ids {
		if id == fromID {
			from = i
		}
	}
	if from < 0 || from == to {
		t.Fatalf("redistest: MoveSlot: slot %d is on node %q, cannot move it to %d", slot, fromID, to)
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("redistest: MoveSlot %d from %d to %d: %v", slot, from, to, err)
		}
	}
	must(nodes[to].Do(ctx, "CLUSTER", "SETSLOT", slot, "IMPORTING", c.ids[from]).Err())
	must(nodes[from].Do(ctx, "CLUSTER", "SETSLOT", slot, "MIGRATING", c.ids[to]).Err())
	host, port, _ := strings.Cut(c.Addrs[to], ":")
	for {
		keys, err := nodes[from].ClusterGetKeysInSlot(ctx, slot, 100).Result()
		must(err)
		if len(keys) == 0 {
			break
		}
		args := []any{"MIGRATE", host, port, "", 0, 5000, "KEYS"}
		for _, k := range keys {
			args = append(args, k)
		}
		must(nodes[from].Do(ctx, args...).Err())
	}
	must(nodes[to].Do(ctx, "CLUSTER", "SETSLOT", slot, "NODE", c.ids[to]).Err())
	must(nodes[from].Do(ctx, "CLUSTER", "SETSLOT", slot, "NODE", c.ids[to]).Err())
	for i, n := range nodes {
		if i != from && i != to {
			must(n.Do(ctx, "CLUSTER", "SETSLOT", slot, "NODE", c.ids[to]).Err())
		}
	}
	for {
		agreed := true
		for _, n := range nodes {
			if id, err := owner(n); err != nil || id != c.ids[to] {
				agreed = false
			}
		}
		if agreed {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("redistest: MoveSlot %d: nodes do not agree on the new owner", slot)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// AddReplica starts a new cluster node, makes it a replica of the master
// that owns key's slot, and returns that master and the replica once the
// replica's link is up and the other masters know it (a failover to it,
// CLUSTER FAILOVER TAKEOVER on the replica or the master's death, then
// keeps the slot's keys). The replica is stopped by t.Cleanup.
func (c *Cluster) AddReplica(t testing.TB, key string) (master, replica *Server) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	master = c.ServerFor(key)
	madm := redis.NewClient(master.Options())
	defer madm.Close()
	id, err := madm.Do(ctx, "CLUSTER", "MYID").Text()
	if err != nil {
		t.Fatalf("redistest: CLUSTER MYID: %v", err)
	}
	replica = NewServer(t, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
		"--cluster-node-timeout", "2000", "--cluster-announce-ip", "127.0.0.1")
	radm := redis.NewClient(replica.Options())
	defer radm.Close()
	host, port, _ := strings.Cut(master.Addr, ":")
	if err := radm.Do(ctx, "CLUSTER", "MEET", host, port).Err(); err != nil {
		t.Fatalf("redistest: CLUSTER MEET: %v", err)
	}
	for ctx.Err() == nil && radm.Do(ctx, "CLUSTER", "REPLICATE", id).Err() != nil {
		time.Sleep(100 * time.Millisecond) // until the replica knows the master
	}
	for ctx.Err() == nil {
		s, _ := radm.Info(ctx, "replication").Result()
		if strings.Contains(s, "master_link_status:up") {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if ctx.Err() != nil {
		t.Fatalf("redistest: the replica of %s did not come up", master.Addr)
	}
	time.Sleep(2 * time.Second) // gossip: every master knows the replica
	return master, replica
}
