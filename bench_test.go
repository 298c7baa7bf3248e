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
