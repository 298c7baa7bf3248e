package redlatch_test

import (
	"context"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/redlatch/redlatch"
	"github.com/redlatch/redlatch/internal/redistest"
)

// benchBackend returns the real single redis-server when there is one, else
// miniredis.
func benchBackend(b *testing.B) redistest.Backend {
	b.Helper()
	backends := redistest.Backends(b)
	for _, be := range backends {
		if be.Name == "redis" {
			return be
		}
	}
	return backends[0]
}

// casDelete is the floor's release: compare-and-delete in one script.
var casDelete = redis.NewScript(`if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0`)

// BenchmarkUncontended measures one uncontended Lock+Unlock pair, beside
// the raw floor measured in the same run: go-redis SET NX PX plus an EVALSHA
// compare-and-delete, the least any correct Redis lock can do. Compare
// ns/op of Mutex and ReentrantMutex to Floor.
//
//	go test -run '^$' -bench Uncontended -count 6 .
func BenchmarkUncontended(b *testing.B) {
	be := benchBackend(b)
	ctx := context.Background()
	b.Run("Floor", func(b *testing.B) {
		rdb := be.Client(b)
		key, owner := redistest.UniqueName(b), "owner"
		for b.Loop() {
			ok, err := rdb.SetNX(ctx, key, owner, 30*time.Second).Result()
			if err != nil || !ok {
				b.Fatal(ok, err)
			}
			if err := casDelete.Run(ctx, rdb, []string{key}, owner).Err(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("Mutex", func(b *testing.B) {
		c := redlatch.New(be.Client(b))
		defer c.Close()
		m := c.Mutex(redistest.UniqueName(b))
		for b.Loop() {
			if err := m.Lock(ctx); err != nil {
				b.Fatal(err)
			}
			if err := m.Unlock(ctx); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("ReentrantMutex", func(b *testing.B) {
		c := redlatch.New(be.Client(b))
		defer c.Close()
		m := c.ReentrantMutex(redistest.UniqueName(b))
		for b.Loop() {
			if err := m.Lock(ctx); err != nil {
				b.Fatal(err)
			}
			if err := m.Unlock(ctx); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkUncontendedRatio interleaves the floor, Mutex and ReentrantMutex
// pair by pair, so that machine drift hits all three alike, and reports each
// one's mean time per pair and the ratios to the floor (mutex/floor,
// reentrant/floor).
//
//	go test -run '^$' -bench UncontendedRatio -benchtime 5000x -count 5 .
func BenchmarkUncontendedRatio(b *testing.B) {
	be := benchBackend(b)
	ctx := context.Background()
	rdb := be.Client(b)
	c := redlatch.New(be.Client(b))
	defer c.Close()
	floorKey := redistest.UniqueName(b)
	m := c.Mutex(redistest.UniqueName(b))
	rm := c.ReentrantMutex(redistest.UniqueName(b))
	var floor, mutex, reentrant time.Duration
	for b.Loop() {
		t0 := time.Now()
		if ok, err := rdb.SetNX(ctx, floorKey, "owner", 30*time.Second).Result(); err != nil || !ok {
			b.Fatal(ok, err)
		}
		if err := casDelete.Run(ctx, rdb, []string{floorKey}, "owner").Err(); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if err := m.Lock(ctx); err != nil {
			b.Fatal(err)
		}
		if err := m.Unlock(ctx); err != nil {
			b.Fatal(err)
		}
		t2 := time.Now()
		if err := rm.Lock(ctx); err != nil {
			b.Fatal(err)
		}
		if err := rm.Unlock(ctx); err != nil {
			b.Fatal(err)
		}
		t3 := time.Now()
		floor += t1.Sub(t0)
		mutex += t2.Sub(t1)
		reentrant += t3.Sub(t2)
	}
	n := float64(b.N)
	b.ReportMetric(float64(floor.Microseconds())/n, "floor-µs/pair")
	b.ReportMetric(float64(mutex.Microseconds())/n, "mutex-µs/pair")
	b.ReportMetric(float64(reentrant.Microseconds())/n, "reentrant-µs/pair")
	b.ReportMetric(float64(mutex)/float64(floor), "mutex/floor")
	b.ReportMetric(float64(reentrant)/float64(floor), "reentrant/floor")
}
