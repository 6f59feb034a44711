package storage

import "sync/atomic"

// Stats are etcd's /v2/stats/store counters, kept in memory since Open.
type Stats struct {
	GetSuccess              uint64 `json:"getsSuccess"`
	GetFail                 uint64 `json:"getsFail"`
	SetSuccess              uint64 `json:"setsSuccess"`
	SetFail                 uint64 `json:"setsFail"`
	DeleteSuccess           uint64 `json:"deleteSuccess"`
	DeleteFail              uint64 `json:"deleteFail"`
	UpdateSuccess           uint64 `json:"updateSuccess"`
	UpdateFail              uint64 `json:"updateFail"`
	CreateSuccess           uint64 `json:"createSuccess"`
	CreateFail              uint64 `json:"createFail"`
	CompareAndSwapSuccess   uint64 `json:"compareAndSwapSuccess"`
	CompareAndSwapFail      uint64 `json:"compareAndSwapFail"`
	CompareAndDeleteSuccess uint64 `json:"compareAndDeleteSuccess"`
	CompareAndDeleteFail    uint64 `json:"compareAndDeleteFail"`
	ExpireCount             uint64 `json:"expireCount"`
	Watchers                uint64 `json:"watchers"`
}

// Stats returns a copy of the counters.
func (s *Store) Stats() Stats {
	c := &s.counters
	return Stats{
		GetSuccess:              c.gets[0].Load(),
		GetFail:                 c.gets[1].Load(),
		SetSuccess:              c.sets[0].Load(),
		SetFail:                 c.sets[1].Load(),
		DeleteSuccess:           c.deletes[0].Load(),
		DeleteFail:              c.deletes[1].Load(),
		UpdateSuccess:           c.updates[0].Load(),
		UpdateFail:              c.updates[1].Load(),
		CreateSuccess:           c.creates[0].Load(),
		CreateFail:              c.creates[1].Load(),
		CompareAndSwapSuccess:   c.compareAndSwaps[0].Load(),
		CompareAndSwapFail:      c.compareAndSwaps[1].Load(),
		CompareAndDeleteSuccess: c.compareAndDeletes[0].Load(),
		CompareAndDeleteFail:    c.compareAndDeletes[1].Load(),
		ExpireCount:             c.expires.Load(),
		Watchers:                uint64(s.hub.count.Load()),
	}
}

// counters are the live Stats; each pair is {success, fail}.
type counters struct {
	gets, sets, deletes, updates, creates, compareAndSwaps, compareAndDeletes [2]atomic.Uint64
	expires                                                                   atomic.Uint64
}

// statDelta is what one Save adds to the counters, once it has committed:
// a transaction that fails leaves the counters as they were.
type statDelta struct {
	gets, sets, deletes, updates, creates, compareAndSwaps, compareAndDeletes [2]uint64
	expires                                                                   uint64
}

// merge adds o to d.
func (d *statDelta) merge(o *statDelta) {
	for i := range 2 {
		d.gets[i] += o.gets[i]
		d.sets[i] += o.sets[i]
		d.deletes[i] += o.deletes[i]
		d.updates[i] += o.updates[i]
		d.creates[i] += o.creates[i]
		d.compareAndSwaps[i] += o.compareAndSwaps[i]
		d.compareAndDeletes[i] += o.compareAndDeletes[i]
	}
	d.expires += o.expires
}

func (d *statDelta) count(pair *[2]uint64, ok bool) {
	if ok {
		pair[0]++
	} else {
		pair[1]++
	}
}

func (c *counters) add(d *statDelta) {
	add := func(dst *[2]atomic.Uint64, src [2]uint64) {
		for i := range src {
			if src[i] != 0 {
				dst[i].Add(src[i])
			}
		}
	}
	add(&c.gets, d.gets)
	add(&c.sets, d.sets)
	add(&c.deletes, d.deletes)
	add(&c.updates, d.updates)
	add(&c.creates, d.creates)
	add(&c.compareAndSwaps, d.compareAndSwaps)
	add(&c.compareAndDeletes, d.compareAndDeletes)
	if d.expires != 0 {
		c.expires.Add(d.expires)
	}
}
