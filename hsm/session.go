package hsm

import (
	"errors"
	"fmt"

	"github.com/miekg/pkcs11"
)

// The calls a Session makes. Each wraps its error as an *OpError naming the function.

// findOne returns the single object matching template: ErrObjectNotFound when there is
// none, ErrAmbiguous when there are several (taking the first of two would be a guess).
func (s *Session) findOne(template []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	hs, err := s.find(template, 2)
	if err != nil {
		return 0, err
	}
	switch len(hs) {
	case 0:
		return 0, ErrObjectNotFound
	case 1:
		return hs[0], nil
	default:
		return 0, ErrAmbiguous
	}
}

// find returns up to max objects matching template (all of them when max <= 0).
func (s *Session) find(template []*pkcs11.Attribute, max int) (out []pkcs11.ObjectHandle, err error) {
	if err := s.api.FindObjectsInit(s.h, template); err != nil {
		return nil, opErr(s.cluster, "C_FindObjectsInit", err)
	}
	defer func() {
		if ferr := s.api.FindObjectsFinal(s.h); ferr != nil {
			err = errors.Join(err, opErr(s.cluster, "C_FindObjectsFinal", ferr))
		}
	}()
	const batch = 64
	for max <= 0 || len(out) < max {
		n := batch
		if max > 0 {
			n = min(batch, max-len(out))
		}
		hs, _, err := s.api.FindObjects(s.h, n)
		if err != nil {
			return nil, opErr(s.cluster, "C_FindObjects", err)
		}
		out = append(out, hs...)
		if len(hs) < n {
			break
		}
	}
	return out, nil
}

// attributes reads the named attributes of o, returning their values in the same order.
func (s *Session) attributes(o pkcs11.ObjectHandle, types ...uint) ([][]byte, error) {
	template := make([]*pkcs11.Attribute, len(types))
	for i, t := range types {
		template[i] = pkcs11.NewAttribute(t, nil)
	}
	attrs, err := s.api.GetAttributeValue(s.h, o, template)
	if err != nil {
		return nil, opErr(s.cluster, "C_GetAttributeValue", err)
	}
	out := make([][]byte, len(types))
	for _, a := range attrs {
		for i, t := range types {
			if a.Type == t {
				out[i] = a.Value
			}
		}
	}
	return out, nil
}

func (s *Session) createObject(template []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	h, err := s.api.CreateObject(s.h, template)
	return h, opErr(s.cluster, "C_CreateObject", err)
}

func (s *Session) destroyObject(o pkcs11.ObjectHandle) error {
	return opErr(s.cluster, "C_DestroyObject", s.api.DestroyObject(s.h, o))
}

// destroyAll destroys every object matching template.
func (s *Session) destroyAll(template []*pkcs11.Attribute) error {
	hs, err := s.find(template, 0)
	if err != nil {
		return err
	}
	for _, h := range hs {
		if err := s.destroyObject(h); err != nil {
			return err
		}
	}
	return nil
}

func (s *Session) sign(key pkcs11.ObjectHandle, mech uint, data []byte) ([]byte, error) {
	if err := s.api.SignInit(s.h, []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}, key); err != nil {
		return nil, opErr(s.cluster, "C_SignInit", err)
	}
	sig, err := s.api.Sign(s.h, data)
	if err != nil {
		return nil, opErr(s.cluster, "C_Sign", err)
	}
	return sig, nil
}

// GenerateRandom returns n random bytes from the token.
func (s *Session) GenerateRandom(n int) ([]byte, error) {
	b, err := s.api.GenerateRandom(s.h, n)
	if err != nil {
		return nil, opErr(s.cluster, "C_GenerateRandom", err)
	}
	if len(b) != n {
		return nil, fmt.Errorf("cluster %s: C_GenerateRandom: got %d bytes, want %d", s.cluster, len(b), n)
	}
	return b, nil
}
