-- wrk script: valid claims on one hot coupon, every request from a user of its own, so
-- that every claim is a grant (the coupon's stock covers the run).
-- wrk -s bench/claims.lua http://127.0.0.1:PORT -- COUPON PREFIX
local threads = {}
local next_id = 1

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  coupon = args[1] or "HOT"
  prefix = args[2] or "wrk"
  counter = 0
  invalid = args[3] == "invalid"
end

function request()
  counter = counter + 1
  local user = string.format("%s_%d_%d", prefix, id, counter)
  if invalid then
    user = "" -- refused by validation: the 400 path, no pipeline
  end
  local body = string.format('{"user_id":"%s","coupon_name":"%s"}', user, coupon)
  return wrk.format("POST", "/api/coupons/claim", {["Content-Type"] = "application/json"}, body)
end
